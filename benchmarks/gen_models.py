"""Generate deterministic, realistic-shape Llama-architecture HF checkpoints for benchmarks.

Writes ``OUT/base`` and ``OUT/expert_1`` .. ``OUT/expert_N``. Each folder is a Hugging Face model folder:
``config.json`` (LlamaForCausalLM), ``generation_config.json`` and either ``model.safetensors`` or shards
``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

Weights are random but shaped like the real models: linear weights ~ N(0, 0.02), RMSNorm weights ~ 1.
Experts are the base plus a small random delta (``--delta-scale`` x the tensor's RMS), each expert with its
own seed, so that task vectors are small, dense and sign-mixed like a fine-tune's. Every tensor has its own
seed (derived from ``--seed``, the model index and the tensor name), so the bytes do not depend on
sharding or on generation order.

Memory stays bounded: one shard of the base is generated and written, then each expert's version of that
shard is derived and written, so at most two shards are held at once.

A folder is skipped when its ``.complete`` marker matches the requested parameters.

Examples::

    python benchmarks/gen_models.py bench-data/qwen0.5b                      # base + 3 experts, ~1 GB each
    python benchmarks/gen_models.py /tmp/tiny --layers 2 --hidden 64 --intermediate 128 --vocab 256 \
        --heads 4 --kv-heads 2 --experts 2
    python benchmarks/gen_models.py bench-data/llama3b --preset llama3b --experts 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS: dict[str, dict] = {
    # Qwen2.5-0.5B-like dimensions on the Llama architecture (no q/k/v biases): ~494M params.
    "qwen0.5b": dict(layers=24, hidden=896, intermediate=4864, vocab=151936, heads=14, kv_heads=2, tied=True),
    # Llama-3.2-3B: ~3.2B params.
    "llama3b": dict(layers=28, hidden=3072, intermediate=8192, vocab=128256, heads=24, kv_heads=8, tied=True),
    # Llama-3-8B: ~8.0B params, ~16 GB in bf16 (base + 3 experts do not fit a 24 GB page cache).
    "llama8b": dict(
        layers=32, hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, tied=False
    ),
    # Tiny, for tests and smoke runs.
    "tiny": dict(layers=2, hidden=64, intermediate=128, vocab=256, heads=4, kv_heads=2, tied=False),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02  # Llama's initializer_range
NORM_STD = 0.05  # spread of RMSNorm weights around 1.0
MARKER = ".complete"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Spec:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    dtype: str = "bfloat16"
    seed: int = 0
    shard_size: int = 2 * 1000**3
    delta_scale: float = 0.01

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tensor_shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama checkpoint, in the order HF writes them."""
    h, i, hd = spec.hidden, spec.intermediate, spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (spec.heads * hd, h)),
            (p + "self_attn.k_proj.weight", (spec.kv_heads * hd, h)),
            (p + "self_attn.v_proj.weight", (spec.kv_heads * hd, h)),
            (p + "self_attn.o_proj.weight", (h, spec.heads * hd)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not spec.tied:
        out.append(("lm_head.weight", (spec.vocab, h)))
    return out


def plan_shards(spec: Spec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors greedily into shards of at most ``spec.shard_size`` bytes (one tensor may exceed it)."""
    itemsize = torch.empty((), dtype=DTYPES[spec.dtype]).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(spec):
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > spec.shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _generator(spec: Spec, model: int, name: str) -> torch.Generator:
    key = f"{spec.seed}/{model}/{name}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key) + (spec.seed << 32))


def base_tensor(spec: Spec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = DTYPES[spec.dtype]
    t = torch.randn(shape, generator=_generator(spec, 0, name), dtype=dtype)
    if name.endswith("norm.weight"):
        return t.mul_(NORM_STD).add_(1.0)
    return t.mul_(INIT_STD)


def expert_tensor(spec: Spec, expert: int, name: str, base: torch.Tensor) -> torch.Tensor:
    """``base`` + N(0, 1) * delta_scale * rms(base), with a seed of its own per expert and tensor."""
    rms = base.float().pow(2).mean().sqrt().item()
    delta = torch.randn(base.shape, generator=_generator(spec, expert, name), dtype=base.dtype)
    return delta.mul_(spec.delta_scale * rms).add_(base)


def hf_config(spec: Spec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.45.0",
    }


def _marker(spec: Spec, model: int) -> str:
    return json.dumps({"format": FORMAT_VERSION, "model": model, **asdict(spec)}, sort_keys=True)


def is_complete(folder: Path, spec: Spec, model: int) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().strip() == _marker(spec, model)


def model_dirs(out: Path, experts: int) -> list[Path]:
    return [out / "base"] + [out / f"expert_{k}" for k in range(1, experts + 1)]


def generate(out: Path, spec: Spec, experts: int, quiet: bool = False) -> list[Path]:
    """Write base + ``experts`` checkpoints under ``out``; returns their folders (base first)."""
    dirs = model_dirs(out, experts)
    todo = [k for k, d in enumerate(dirs) if not is_complete(d, spec, k)]
    if not todo:
        return dirs
    t0 = time.perf_counter()
    for k in todo:  # start each incomplete folder afresh
        shutil.rmtree(dirs[k], ignore_errors=True)
        dirs[k].mkdir(parents=True)
    shards = plan_shards(spec)
    n = len(shards)
    files = (
        ["model.safetensors"] if n == 1 else [f"model-{s + 1:05d}-of-{n:05d}.safetensors" for s in range(n)]
    )
    total = 0
    for s, shard in enumerate(shards):
        base = {name: base_tensor(spec, name, shape) for name, shape in shard}
        total += sum(t.numel() * t.element_size() for t in base.values())
        for k in todo:
            tensors = base if k == 0 else {n_: expert_tensor(spec, k, n_, t) for n_, t in base.items()}
            save_file(tensors, str(dirs[k] / files[s]), metadata={"format": "pt"})
            del tensors
        del base
        if not quiet:
            print(f"  shard {s + 1}/{n} written ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    weight_map = {name: files[s] for s, shard in enumerate(shards) for name, _ in shard}
    for k in todo:
        d = dirs[k]
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (d / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
        gen = {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.45.0"}
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (d / MARKER).write_text(_marker(spec, k) + "\n")
    if not quiet:
        gb = total / 1e9
        print(
            f"generated {len(todo)} checkpoint(s) of {gb:.2f} GB in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
    return dirs


def parse_size(text: str) -> int:
    """'2GB', '500MB', '5B' (bytes, mergekit style) or a plain integer of bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def spec_from_args(args: argparse.Namespace) -> Spec:
    shape = dict(PRESETS[args.preset])
    for key in ("layers", "hidden", "intermediate", "vocab", "heads", "kv_heads", "tied"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise SystemExit("hidden must be divisible by heads, and heads by kv-heads")
    return Spec(
        **shape,
        dtype=args.dtype,
        seed=args.seed,
        shard_size=parse_size(args.shard_size),
        delta_scale=args.delta_scale,
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (gets base/ and expert_K/ subfolders)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen0.5b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument(
        "--tied", action=argparse.BooleanOptionalAction, default=None, help="tie lm_head to embeddings"
    )
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--experts", type=int, default=3, help="fine-tuned-like variants besides the base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="2GB", help="max shard size, e.g. 2GB, 500MB (default 2GB)")
    ap.add_argument("--delta-scale", type=float, default=0.01, help="expert delta std relative to tensor RMS")
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for d in generate(args.out, spec_from_args(args), args.experts, quiet=args.quiet):
        print(d)


if __name__ == "__main__":
    main()
