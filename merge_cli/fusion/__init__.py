"""Decoding-time fusion: a large model's logits shifted by small experts' deltas (weak-to-strong).

logit_fusion: the maths on logit tensors; preflight: tokenizer/vocabulary checks from headers;
decode: the loop with one KV cache per model; spec: the `kind: logit_fusion` recipe; run: end to end.
"""
