"""`merge-cli generate`: decoding-time logit fusion of a large model with small experts (no merge written)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import handle_errors


def _max_kl(value: Optional[str]):
    if value is None:
        return None, False
    v = value.strip().lower()
    if v == "auto":
        return "auto", True
    if v in ("none", "off"):
        return None, True
    try:
        f = float(v)
    except ValueError:
        raise typer.BadParameter("use auto, none or a number >= 0", param_hint="--max-kl") from None
    if not f >= 0:
        raise typer.BadParameter("use auto, none or a number >= 0", param_hint="--max-kl")
    return f, True


@handle_errors
def generate(
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="A YAML recipe with kind: logit_fusion; the options below override its keys."
    ),
    large: Optional[str] = typer.Option(None, "--large", help="The strong model (HF folder), used as is."),
    small_base: Optional[str] = typer.Option(
        None, "--small-base", help="The small model the experts were fine-tuned from (HF folder)."
    ),
    expert: Optional[list[str]] = typer.Option(
        None, "--expert", help="A small fine-tuned expert (HF folder); repeat for several."
    ),
    weight: Optional[list[float]] = typer.Option(
        None,
        "--weight",
        help="Static mode: the weight of each expert's delta, in --expert order (default 1).",
    ),
    mode: Optional[str] = typer.Option(
        None,
        "--mode",
        help="static: logits = large + sum w_i (expert_i - small_base) with fixed w (proxy tuning); "
        "dynamic (default): w solved per step by the KL-matching problem of Fan et al. 2024.",
    ),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A prompt text; repeat for several."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help='A JSON-lines file: one string or {"prompt": ...} per line.'
    ),
    max_new_tokens: Optional[int] = typer.Option(
        None, min=1, help="Tokens to generate per prompt (default 64)."
    ),
    temperature: Optional[float] = typer.Option(
        None, min=0.0, help="0 (default): greedy; > 0: sample from softmax(fused / temperature)."
    ),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (default 0): the same seed, the same text."),
    device: Optional[str] = typer.Option(None, help="cpu (default), cuda or cuda:N."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype: float32 (default), bfloat16 or float16."),
    alpha_max: Optional[float] = typer.Option(None, help="Dynamic: largest weight searched (default 2.0)."),
    alpha_step: Optional[float] = typer.Option(
        None, help="Dynamic: grid step of the weight search (default 0.1)."
    ),
    search: Optional[str] = typer.Option(
        None,
        help="Dynamic: one_expert (default; one expert active per step, T x grid candidates, as the paper's "
        "multi-task shortcut) or joint (every combination: grid ** T candidates).",
    ),
    max_kl: Optional[str] = typer.Option(
        None,
        help="Dynamic: bound on KL(fused || large) per step: auto (default: the largest KL(expert || small "
        "base) of the step), none (the paper's objective alone) or a number.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per prompt (text, tokens, per-step weights and KLs)."
    ),
):
    """Generate text with a large model steered by small experts' logit deltas (weak-to-strong fusion).

    Each step every model runs once (own KV cache) and the large model's logits are shifted by the weighted
    differences expert - small_base. Checks the tokenizers and vocabulary sizes before loading any weight.

    Example: merge-cli generate --large ./llama-13b --small-base ./llama-7b --expert ./llama-7b-math
    --prompt "Q: 12+30=" --max-new-tokens 32
    """
    from merge_cli.errors import RecipeError
    from merge_cli.fusion.run import FusionRequest, run_fusion
    from merge_cli.fusion.spec import FusionSpec, load_fusion_spec

    base_dir = Path.cwd()
    if recipe is not None:
        spec = load_fusion_spec(recipe)
        base_dir = recipe.resolve().parent
    else:
        missing = [
            n for n, v in (("--large", large), ("--small-base", small_base), ("--expert", expert)) if not v
        ]
        if missing:
            raise RecipeError(f"give {', '.join(missing)} (or --recipe FILE with kind: logit_fusion)")
        spec = FusionSpec(kind="logit_fusion", large=large, small_base=small_base, experts=list(expert))
    data = spec.model_dump()
    data["experts"] = [e.model_dump() for e in spec.expert_list()]
    if large:
        data["large"] = large
    if small_base:
        data["small_base"] = small_base
    if expert:
        data["experts"] = [{"model": e, "weight": 1.0} for e in expert]
    if mode is not None:
        if mode not in ("static", "dynamic"):
            raise typer.BadParameter("use static or dynamic", param_hint="--mode")
        data["mode"] = mode
    if weight:
        exps = data["experts"]
        if len(weight) not in (1, len(exps)):
            raise RecipeError(
                f"{len(weight)} --weight values for {len(exps)} experts; give one or one per expert"
            )
        for i, e in enumerate(exps):
            e["weight"] = weight[i] if len(weight) > 1 else weight[0]
    gen = data["generation"]
    for key, val in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("seed", seed),
        ("device", device),
        ("dtype", dtype),
    ):
        if val is not None:
            gen[key] = val
    dyn = data["dynamic"]
    for key, val in (("alpha_max", alpha_max), ("alpha_step", alpha_step), ("search", search)):
        if val is not None:
            dyn[key] = val
    mk, given = _max_kl(max_kl)
    if given:
        dyn["max_kl"] = mk
    try:
        spec = FusionSpec.model_validate(data)
    except Exception as e:  # pydantic ValidationError from an option value
        first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
        key = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"option {key}: {first['msg']}") from None
    texts, prompts_path = list(prompt or []), prompts
    if not texts and prompts_path is None:  # no prompt on the command line: the recipe's
        texts = list(spec.prompts)
        prompts_path = base_dir / spec.prompts_file if spec.prompts_file else None
    req = FusionRequest(spec=spec, base_dir=base_dir, prompts=texts, prompts_file=prompts_path)

    def on_start(i: int, text: str) -> None:
        if not as_json:
            if i:
                sys.stdout.write("\n")
            sys.stdout.flush()

    def on_text(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    def on_note(note: str) -> None:
        print(f"note: {note}", file=sys.stderr, flush=True)

    for g in run_fusion(req, on_start=on_start, on_text=None if as_json else on_text, on_note=on_note):
        if as_json:
            print(json.dumps(g.to_json()), flush=True)
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            rate = len(g.token_ids) / g.seconds if g.seconds > 0 else float("inf")
            print(f"[{len(g.token_ids)} tokens, {rate:.1f} tokens/s, stop: {g.stopped}]", file=sys.stderr)
