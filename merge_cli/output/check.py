"""`merge-cli check OUT_DIR [--against MODEL]`: a smoke test for 'the merge succeeded but the model speaks
gibberish'.

Loads the merged model with transformers (the optional `check` extra), generates greedily from a few
built-in prompts, computes perplexity on a built-in English text, and compares with a reference model:
`--against`, else the recipe's base model as recorded in merge_report.json (else its first model).
Fails (exit 3) when any logit is NaN/inf, or when perplexity / reference perplexity > --max-ppl-ratio
(default 1.5: a merge of related fine-tunes usually lands within a few percent of its base on plain
text, while broken merges - wrong scales, mixed vocabularies - are off by large factors).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from merge_cli.errors import MergeCliError

PROMPTS = (
    "the people of the world",
    "water is part of life and",
    "this is the first time that",
)
TEXT = (
    "the people of the world have made many great things . "
    "water is part of life and each day people work to help the old and the small . "
    "there is a long way from the first word to the last line , but people think and say what they mean . "
    "when the sound is low and the day is long , it is good to turn to work that will show how much we have learned . "
    "most of the time we can help each other , and that is the right way to live ."
)
DEFAULT_MAX_PPL_RATIO = 1.5


class CheckFailed(MergeCliError):
    """The merged model failed a sanity threshold."""

    exit_code = 3


@dataclass
class ModelFigures:
    model: str
    perplexity: float
    finite: bool
    generations: list[str] = field(default_factory=list)
    distinct_fraction: float = 0.0  # distinct generated tokens / generated tokens (repetition shows as low)


@dataclass
class CheckResult:
    merged: ModelFigures
    reference: ModelFigures | None
    ppl_ratio: float | None
    max_ppl_ratio: float
    passed: bool
    reasons: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MergeCliError(
            "merge-cli check needs transformers: pip install 'merge-cli[check]' (or pip install transformers)"
        ) from None
    return transformers


def reference_from_report(out_dir: Path) -> str | None:
    """The base model (else the first model) recorded in the output's merge_report.json, as a loadable path."""
    try:
        report = json.loads((Path(out_dir) / "merge_report.json").read_text())
    except (OSError, ValueError):
        return None
    models = report.get("models") or []
    pick = next((m for m in models if m.get("label") == "base"), models[0] if models else None)
    if pick is None:
        return None
    path = Path(pick.get("path") or "")
    return str(path) if (path / "config.json").is_file() else None


def _resolve_model(ref: str) -> str:
    """A loadable local folder for a path or a hub id (a hub id is downloaded through the hub cache)."""
    if Path(ref).expanduser().exists():
        return str(Path(ref).expanduser())
    from merge_cli.io.refs import hub_ref_of

    hub = hub_ref_of(ref)
    if hub is None:
        raise MergeCliError(f"--against {ref}: no such folder and not a hub id")
    from merge_cli.io.hub import HubCheckpoint

    ck = HubCheckpoint(ref, hub)
    ck.fetch()
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        ck.side_file(name)
    ck.close()
    return str(ck.path)


def _load(path: str, dtype: str, device: str):
    tf = _transformers()
    import torch

    tf.utils.logging.disable_progress_bar()
    kw: dict[str, Any] = {}
    if dtype != "auto":
        kw["dtype"] = getattr(torch, dtype)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise MergeCliError(
            f"{path}: transformers cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return model.to(device).eval()


def greedy(model, ids, n: int) -> list[int]:
    """Greedy continuation of `ids` by `n` tokens: plain forwards, no generation config involved."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids, use_cache=False).logits[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out


def figures(model, tokenizer, label: str, device: str, max_new_tokens: int = 12) -> ModelFigures:
    import torch

    ids = tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        logits = model(ids).logits.float()
    finite = bool(torch.isfinite(logits).all())
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ppl = math.exp(float(loss)) if finite and math.isfinite(float(loss)) else math.inf
    gens, distinct = [], []
    for prompt in PROMPTS if finite else ():  # a model with NaN logits has nothing to say
        new = greedy(model, tokenizer(prompt, return_tensors="pt").input_ids.to(device), max_new_tokens)
        gens.append(tokenizer.decode(new, skip_special_tokens=True))
        distinct.append(len(set(new)) / max(1, len(new)))
    return ModelFigures(
        label, ppl, finite, gens, round(sum(distinct) / len(distinct), 4) if distinct else 0.0
    )


def run_check(
    out_dir: Path,
    against: str | None = None,
    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO,
    dtype: str = "float32",
    device: str = "cpu",
) -> CheckResult:
    tf = _transformers()
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        raise MergeCliError(f"{out_dir}: no config.json; is it a merged model folder?")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(out_dir))
    except Exception as e:  # noqa: BLE001
        raise MergeCliError(
            f"{out_dir}: no usable tokenizer ({type(e).__name__}); the check needs one"
        ) from None
    merged = figures(_load(str(out_dir), dtype, device), tokenizer, str(out_dir), device)
    ref_path = _resolve_model(against) if against else reference_from_report(out_dir)
    reference = figures(_load(ref_path, dtype, device), tokenizer, ref_path, device) if ref_path else None
    reasons = []
    if not merged.finite:
        reasons.append("the merged model produces NaN or infinite logits")
    ratio = None
    if reference is not None and math.isfinite(reference.perplexity) and reference.perplexity > 0:
        ratio = merged.perplexity / reference.perplexity
        if ratio > max_ppl_ratio:
            reasons.append(
                f"perplexity {merged.perplexity:.3g} is {ratio:.2f}x the reference's (limit {max_ppl_ratio})"
            )
    return CheckResult(merged, reference, ratio, max_ppl_ratio, not reasons, reasons)


def render(result: CheckResult) -> str:
    lines = []
    for f in [result.merged] + ([result.reference] if result.reference else []):
        lines.append(
            f"{f.model}: perplexity {f.perplexity:.4g}, finite logits {f.finite}, distinct tokens {f.distinct_fraction:.2f}"
        )
        lines += [f"  > {p} ... {g}" for p, g in zip(PROMPTS, f.generations, strict=False)]
    if result.ppl_ratio is not None:
        lines.append(f"perplexity ratio {result.ppl_ratio:.3f} (limit {result.max_ppl_ratio})")
    else:
        lines.append("no reference model: only finiteness was checked (pass --against MODEL to compare)")
    lines.append("check passed" if result.passed else "check FAILED: " + "; ".join(result.reasons))
    return "\n".join(lines)
