"""EMR-Merging: elect, mask, rescale (METHODS.md §18).

gamma = sign(sum_i tau_i) (zeros count as -1);  M_i = [tau_i * gamma > 0];  tau_uni = gamma * max_i |M_i tau_i|.
The merged output is the unified model theta0 + tau_uni. Each task's model is theta0 + lambda_i M_i tau_uni
with lambda_i = sum_params mean|tau_i| / sum_params mean|M_i tau_uni|: the masks and the rescalers need
a pass of their own (the rescaler sums run over the whole model), so one statistics pass streams the
models, writes every task's mask, bit-packed, to `emr/task-<i>-mask.safetensors` beside the output, and
the rescalers with what `merge-cli emr-materialize` needs to `emr/emr.json`. The main pass writes
theta0 + tau_uni. A task model is materialised from the base and the output: theta0 + lambda_i M_i (out - theta0).
"""

from __future__ import annotations

import json
import math

import torch

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx
from merge_cli.methods.wholemodel import ExactSum, WholeModelStats, colsum, step_elements

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}

EMR_DIR = "emr"
META = "emr.json"


class EmrParams(MethodParams):
    """EMR has no hyperparameters: the masks and rescalers are computed from the task vectors."""


def unify(base: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task vectors [N, ...], masks [N, ...], tau_uni)."""
    taus = torch.stack([t - base for t in tensors])
    gamma = torch.where(colsum(taus)[0] > 0, 1.0, -1.0).to(taus.dtype)
    masks = taus * gamma > 0
    tau_uni = gamma * (taus * masks).abs().amax(dim=0)
    return taus, masks, tau_uni


def chunks(base: torch.Tensor, tensors: list[torch.Tensor]):
    """unify() over flat coordinate ranges [s, e): bounded temporaries for large tensors (steps are
    multiples of 64, so masks are bit-packed step by step)."""
    b = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    step = step_elements(len(tensors), b.element_size())
    for s in range(0, b.numel(), step):
        e = min(s + step, b.numel())
        yield s, e, *unify(b[s:e], [f[s:e] for f in flats])


def emr(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    out = base.clone().reshape(-1)
    for s, e, _, _, tau_uni in chunks(base, tensors):
        out[s:e] += tau_uni
    return out.reshape(base.shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 [ceil(numel / 8)], bit j of byte b = element 8b + j (little bit order)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    shifts = torch.arange(8, dtype=torch.uint8)
    return (flat.reshape(-1, 8) << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


class EmrStats(WholeModelStats):
    rounds = ("task masks and rescalers",)

    def __init__(self, jobs, n_models, side_dir):
        super().__init__(jobs, n_models, side_dir)
        self.num = [0.0] * n_models
        self.den = [0.0] * n_models
        self._sums: list[tuple[ExactSum, ExactSum]] | None = None  # per tensor, over its pieces
        self.files = []
        if side_dir is not None:
            from merge_cli.io.writer import shard_header

            (side_dir / EMR_DIR).mkdir(parents=True, exist_ok=True)
            entries = [(j.name, "U8", (math.ceil(j.numel / 8),), math.ceil(j.numel / 8)) for j in jobs]
            for i in range(n_models):
                f = open(side_dir / EMR_DIR / f"task-{i}-mask.safetensors", "wb")  # noqa: SIM115
                f.write(shard_header(entries, {"format": "emr-mask", "bit_order": "little"}))
                self.files.append(f)

    def gather(self, base, tensors, params, ctx) -> None:
        if self._sums is None:  # the first piece of a tensor
            self._sums = [(ExactSum(), ExactSum()) for _ in tensors]
        for _, _, taus, masks, tau_uni in chunks(base, tensors):
            for i, (num, den) in enumerate(self._sums):
                num.add(taus[i].abs())
                den.add((masks[i] * tau_uni).abs())
                if self.files:
                    self.files[i].write(pack_bits(masks[i]).numpy().tobytes())

    def end_tensor(self, ctx) -> None:
        n = math.prod(ctx.shape or ())
        for i, (num, den) in enumerate(self._sums or () if n else ()):  # sum over tensors of per-tensor means
            self.num[i] += num.value / n
            self.den[i] += den.value / n
        self._sums = None

    def rescalers(self) -> list[float]:
        return [n / d if d > 0 else 1.0 for n, d in zip(self.num, self.den, strict=True)]

    def end_round(self) -> bool:
        for f in self.files:
            f.close()
        if self.side_dir is not None:
            refs = getattr(self, "model_refs", None) or []
            job = self.jobs[0]
            meta = {
                "method": "emr",
                "base": refs[job.base.model] if refs else None,
                "tasks": [
                    {
                        "index": i,
                        "model": refs[inp.model] if refs else None,
                        "mask_file": f"{EMR_DIR}/task-{i}-mask.safetensors",
                        "rescaler": lam,
                    }
                    for i, (inp, lam) in enumerate(zip(job.inputs, self.rescalers(), strict=True))
                ],  # fmt: skip
                "bit_order": "little",
                "tensors": {j.name: list(j.shape) for j in self.jobs},
                "task_model": "theta0 + rescaler * mask * (output - theta0)",
            }
            (self.side_dir / EMR_DIR / META).write_text(json.dumps(meta, indent=1) + "\n")
        return super().end_round()

    def summary(self):
        return {"rescalers": self.rescalers()}


SPEC = MethodSpec(
    name="emr",
    title="EMR-Merging (elect, mask, rescale; one unified model + per-task masks)",
    paper="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024, arXiv:2405.17461",
    params=EmrParams,
    kernel=emr,
    needs_base=True,
    summary="output theta0 + tau_uni, tau_uni = gamma * max_i |M_i tau_i|; task i = theta0 + lambda_i M_i tau_uni "
    "(masks and rescalers in emr/, `merge-cli emr-materialize`)",
    stats=EmrStats,
    mergekit_defaults={},
    elementwise=True,
)
