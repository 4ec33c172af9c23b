"""`make demo`: generate a small example set (a tiny Llama base and three fine-tuned-like variants in real
HF layout), run every recipe in recipes/, and show where the outputs and reports are.

The models are generated deterministically in a second or two, and only when missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "vocab_size": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}

WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are his her have had "
    "not but were they one all their has been more when there who will would can if its about into than "
    "other some them these time only so may then first any new like over such our what two also most "
    "after made many where through out up very before well way even because each much those both under "
    "same while how last world life here year people work day good long small great old right big high "
    "number water part place sound word line name think say help low turn cause mean move show"
).split()


def llama_state_dict(cfg: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random Llama state dict (fp32), scaled like a trained model's initialisation."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape):
        return torch.randn(*shape, generator=generator) * (1.0 / shape[-1] ** 0.5)

    sd = {
        "model.embed_tokens.weight": w(v, h),
        "model.norm.weight": 1 + 0.05 * torch.randn(h, generator=generator),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd.update({
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
            p + "input_layernorm.weight": 1 + 0.05 * torch.randn(h, generator=generator),
            p + "post_attention_layernorm.weight": 1 + 0.05 * torch.randn(h, generator=generator),
        })  # fmt: skip
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = w(v, h)
    return sd


def fine_tune_like(base: dict[str, torch.Tensor], generator: torch.Generator, scale: float = 0.02) -> dict:
    """base + a task vector: a low-rank update plus sparse noise, like a fine-tune's delta."""
    out = {}
    for name, t in base.items():
        if t.dim() == 2:
            r = 2
            a = torch.randn(t.shape[0], r, generator=generator)
            b = torch.randn(r, t.shape[1], generator=generator)
            noise = torch.randn(t.shape, generator=generator) * (
                torch.rand(t.shape, generator=generator) < 0.2
            )
            delta = (a @ b / r + noise) * scale * t.std()
        else:
            delta = torch.randn(t.shape, generator=generator) * scale * 0.5
        out[name] = t + delta
    return out


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = (specials + WORDS)[:vocab_size]
    vocab = {w: i for i, w in enumerate(words)}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, s in enumerate(specials)
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 256,
    }, indent=2))  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }, indent=2))  # fmt: skip


def save_hf(
    folder: Path, sd: dict[str, torch.Tensor], cfg: dict, dtype=torch.bfloat16, shards: int = 1
) -> None:
    """Write a state dict in HF layout with the safetensors library (single file, or `shards` files + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    names = list(sd)
    if shards <= 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[k * per : (k + 1) * per]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": cfg.get("bos_token_id"),
                "eos_token_id": cfg.get("eos_token_id"),
                "max_new_tokens": 16,
            }
        )
    )
    write_tokenizer(folder, cfg["vocab_size"])


def make_example_models(root: Path, cfg: dict | None = None) -> dict[str, Path]:
    """base, math, code, chat (chat is saved as 2 shards with an index). Deterministic; skipped when present."""
    cfg = dict(cfg or TINY_CONFIG)
    names = ["base", "math", "code", "chat"]
    paths = {n: root / n for n in names}
    marker = root / ".complete"
    if marker.exists() and all((p / "config.json").exists() for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(1234)
    base = llama_state_dict(cfg, g)
    save_hf(paths["base"], base, cfg)
    for k, name in enumerate(names[1:], start=1):
        gk = torch.Generator().manual_seed(1234 + k)
        save_hf(paths[name], fine_tune_like(base, gk), cfg, shards=2 if name == "chat" else 1)
    marker.write_text("ok\n")
    return paths


def _try_transformers(out: Path) -> str:
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError:
        return "transformers not installed (pip install 'merge-cli[check]') - load check skipped"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    return f"transformers loaded {type(model).__name__}; logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}"


def _tune_step(repo: Path, console) -> None:
    """A short `merge-cli tune` (issue 17): 10 AdaMerging steps from recipes/tune_adamerging.yaml."""
    start, data = repo / "recipes" / "tune_adamerging.yaml", repo / "recipes" / "tune_data.jsonl"
    try:
        import transformers  # noqa: F401
    except ImportError:
        console.print("tune step skipped: transformers not installed (pip install 'merge-cli[tune]')")
        return
    if not (start.exists() and data.exists()):
        return
    import subprocess

    out = repo / "examples" / "out" / "tuned.yaml"
    t0 = time.perf_counter()
    args = [
        "tune",
        str(start),
        str(out),
        "--data",
        str(data),
        "--steps",
        "10",
        "--lr",
        "0.01",
        "--device",
        "cpu",
    ]
    # a process of its own, as a user runs it (merge_cli.cli.main sets OpenMP's passive wait before torch loads)
    if subprocess.run([sys.executable, "-m", "merge_cli", *args]).returncode != 0:
        console.print("tune step failed (see the line above)")
        return
    console.print(f"tune step: {time.perf_counter() - t0:.1f} s; tuned recipe {out.relative_to(repo)}")


def _analyze(recipe: Path, out_dir: Path) -> str:
    """`merge-cli analyze RECIPE --html`: the task-vector analysis of the ties recipe (well under a second)."""
    from merge_cli.analysis.analyze import analyze
    from merge_cli.output.html_report import analysis_html, write_html
    from merge_cli.plan import build_plan
    from merge_cli.recipe import load_recipe

    plan = build_plan(load_recipe(recipe))
    try:
        res = analyze(plan, 1 << 30, recipe_text=recipe.read_text())
    finally:
        plan.close()
    page = write_html(out_dir / f"analysis-{recipe.stem}.html", analysis_html(res))
    return f"{page} ({len(res['findings'])} finding(s); `merge-cli analyze {recipe.name}` prints them)"


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from merge_cli.errors import MergeCliError
    from merge_cli.merge import execute
    from merge_cli.plan import build_plan
    from merge_cli.recipe import load_recipe

    repo = Path.cwd()
    from merge_cli.fusion.spec import is_fusion_recipe

    # every merge recipe (a logit_fusion recipe decodes instead: `merge-cli generate --recipe`)
    from merge_cli.skillpack.twin import is_twin_recipe

    recipes = [
        p for p in sorted((repo / "recipes").glob("*.yaml")) if not (is_fusion_recipe(p) or is_twin_recipe(p))
    ]
    console = Console()
    t0 = time.perf_counter()
    make_example_models(repo / "examples" / "models")
    console.print(f"example models ready in examples/models ({time.perf_counter() - t0:.1f} s)")
    from merge_cli.skillpack.demo import run_pack_demo

    run_pack_demo(repo, console)  # issue 16: before the recipes (recipes/skillpack_graft.yaml uses its packs)
    table = Table(title="merge-cli demo", show_edge=False)
    for col in ("recipe", "method", "tensors", "seconds", "output"):
        table.add_column(col)
    outs = {}
    for path in recipes:
        out = repo / "examples" / "out" / path.stem
        try:
            plan = build_plan(load_recipe(path))
            try:
                result = execute(plan, out, overwrite=True)
            finally:
                plan.close()
        except MergeCliError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        outs[path.stem] = out
        table.add_row(
            path.name,
            plan.recipe.method,
            str(len(plan.jobs)),
            f"{result.engine.seconds:.2f}",
            str(out.relative_to(repo)),
        )
    console.print(table)
    if "ties" in outs:
        console.print(f"ties output: {_try_transformers(outs['ties'])}")
        console.print(
            f"report: {outs['ties'] / 'merge_report.html'} (and .md, .json); card: {outs['ties'] / 'README.md'}"
        )
        console.print(
            f"analysis before merging: {_analyze(repo / 'recipes' / 'ties.yaml', repo / 'examples' / 'out')}"
        )
    _tune_step(repo, console)
    console.print(
        f"demo done in {time.perf_counter() - t0:.1f} s; try `.venv/bin/merge-cli plan recipes/ties.yaml`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
