"""The memory a tune holds on its device: base + K task vectors + a merged copy and its gradient + activations."""

from __future__ import annotations

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.plan import MergePlan
from merge_cli.tune.merged import TUNABLE

FP32 = 4


def memory_bound(plan: MergePlan, tasks: dict, batch: int) -> dict[str, int]:
    """Bytes a tune holds: the base model, K task vectors, one merged copy of each tuned tensor and (during
    the backward pass, before it is reduced to the coefficients' gradients) its gradient, in the compute
    dtype, plus a rough activation estimate for one batch per task (fp32, kept for the backward pass)."""
    item = ST_TO_TORCH[plan.compute_dtype].itemsize
    tuned = [j for j in plan.jobs if j.method in TUNABLE and j.base is not None]
    k = max((len(j.inputs) for j in tuned), default=0)
    tuned_n = sum(j.numel for j in tuned)
    all_n = sum(j.numel for j in plan.jobs)
    cfg = plan.config or {}
    hidden, layers = int(cfg.get("hidden_size", 0)), int(cfg.get("num_hidden_layers", 0))
    inter, vocab = int(cfg.get("intermediate_size", 4 * hidden)), int(cfg.get("vocab_size", 0))
    tokens = sum(batch * max(len(e.ids) for e in v) for v in tasks.values())
    # per token and layer: residual, norms, q/k/v/o, attention output, MLP in/gate/up/act (~12 h + 3 i)
    act = tokens * (layers * (12 * hidden + 3 * inter) + 3 * vocab) * FP32
    parts = {
        "base": all_n * item, "task vectors": k * tuned_n * item, "merged copy": tuned_n * item,
        "its gradient": tuned_n * item,
    }  # fmt: skip
    return {**parts, "activations": act, "K": k, "total": sum(parts.values()) + act}
