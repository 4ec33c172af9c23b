"""SkillPacks (GraftLLM, METHODS.md §13; Twin-Merging §14): what a fine-tune learned, compressed module by module.

format.py     the versioned file format (safetensors + JSON metadata), reader (validation) and writer
quant.py      round-to-nearest asymmetric quantization of factor rows, bit packing
settings.py   per-module-group knobs and their defaults
compress.py   one tensor's delta -> pack tensors (prune / svd / dense) and back
gptq.py       GPTQ-style error compensation of the SVD factors; calibrate.py collects the input Hessians
extract.py    streamed extraction from two checkpoints
graft.py      apply / remove packs onto a base (an HF model folder out)
checkpoint.py BASE+PACK.skillpack as a merge source (io/refs.py opens it)
peft.py       a pack's SVD modules as a PEFT LoRA adapter
twin.py       Twin-Merging: shared merge + exclusive packs
inspect.py    `pack inspect` summaries; demo.py the `make demo` step
"""
