"""SkillPacks (GraftLLM, METHODS.md §13): what a fine-tune learned, compressed module by module.

format.py    the versioned file format (safetensors + JSON metadata), reader and writer
quant.py     round-to-nearest asymmetric quantization of factor rows, bit packing
settings.py  per-module-group knobs and their defaults
compress.py  one tensor's delta -> pack tensors (prune / svd / dense) and back
extract.py   streamed extraction from two checkpoints
graft.py     apply / remove packs onto a base (a normal HF model folder out)
peft.py      a pack's SVD modules as a PEFT LoRA adapter
"""
