"""`merge-cli tune`: learned merge coefficients (AdaMerging, aTLAS, Self Positioning), written as a recipe.

data.py       JSONL rows -> token sequences (one clear line per bad row)
merged.py     the differentiable merge: task vectors on the device, coefficients per model and group
objective.py  entropy (unlabeled) and nll (prompt/completion) losses through a functional forward
loop.py       Adam over the coefficients, clamping, the seeded sampler, resume state
emit.py       the learned coefficients as an ordinary recipe (checked by re-planning it)
memory.py     the bound on what a tune holds: base + K task vectors + a merged copy + activations
synthetic.py  a tiny two-task benchmark (tests, demo, benchmarks/tune_bench.py)

transformers is an optional extra (`merge-cli[tune]`), imported only when a tune runs.
"""
