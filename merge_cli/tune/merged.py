"""The differentiable merge: theta(c) = theta0 + lambda * sum_k c[g, k] * v_k per tuned tensor.

Tuned tensors are those the plan merges with task_arithmetic or ties. Their per-model task vectors v_k
stay on the device: tau_k = theta_k - theta0 (task_arithmetic), or the TIES-trimmed tau_k (ties; with the
paper's unweighted sign election the entries that disagree with the elected sign are zeroed once, which is
AdaMerging++). Each tuned tensor belongs to one coefficient group (granularity task: one group; layer: one
per decoder layer and one per outer module group; block: one per tensor, as aTLAS), and c[g] holds one
learned weight per model. The arithmetic follows merge_cli/methods (same terms, same order), so the recipe
emit.py writes rebuilds these tensors with `merge-cli run`. Every other tensor (integer buffers, other
methods in overrides) is merged once with its method's kernel and stays fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.errors import MergeCliError
from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.methods.base import mergekit_numerics
from merge_cli.methods.consensus import elect, trim, trim_sorted
from merge_cli.methods.task_arithmetic import accumulator
from merge_cli.plan import MergePlan, TensorJob

TUNABLE = ("task_arithmetic", "ties")
GRANULARITIES = ("task", "layer", "block")


@dataclass
class Tuned:
    name: str
    group: int
    method: str
    vectors: list[torch.Tensor]  # tau_k, or TIES-trimmed (and, with a fixed election, sign-agreeing) tau_k
    lam: float
    normalize: bool = False  # task_arithmetic: divide by sum of weights
    mean: bool = False  # ties merge_func mean: divide by sum of weights of agreeing entries
    reelect: bool = False  # ties weighted_election: the sign follows the current weights


def _wsum(terms, ws, dtype) -> torch.Tensor:
    """sum_k w_k * term_k as merge_cli.methods.task_arithmetic.weighted_sum forms it (products in the
    compute dtype, accumulated in fp32 for half dtypes, rounded once), but differentiable in the w_k."""
    acc_dtype = accumulator(dtype)
    acc = (terms[0] * ws[0]).to(acc_dtype)
    for v, x in zip(terms[1:], ws[1:]):
        acc = acc + (v * x).to(acc_dtype)
    return acc.to(dtype)


def group_key(job: TensorJob, granularity: str) -> str:
    if granularity == "task":
        return "all"
    if granularity == "layer":
        return f"layer {job.layer}" if job.layer is not None else job.group
    return job.name


def _params(job: TensorJob) -> ParamSet:
    return ParamSet({k: (tuple(v) if isinstance(v, list) else v) for k, v in job.params.items()})


def _check_tunable(job: TensorJob) -> None:
    p = job.params
    if job.method == "ties":
        if p.get("granularity") == "model":
            raise MergeCliError(
                f"tensor '{job.name}': tune supports ties with granularity: tensor (not model); "
                "set `granularity: tensor` in the recipe"
            )
        if p.get("merge_func") == "max":
            raise MergeCliError(
                f"tensor '{job.name}': ties merge_func max has no gradient in the weights; use mean or sum"
            )


class MergedModel:
    """Task vectors of the tuned tensors on `device`, fixed tensors merged once, coefficient groups."""

    def __init__(self, plan: MergePlan, granularity: str, device: torch.device):
        if granularity not in GRANULARITIES:
            raise MergeCliError(f"--granularity {granularity}: use one of {', '.join(GRANULARITIES)}")
        self.plan, self.device = plan, device
        self.dtype = ST_TO_TORCH[plan.compute_dtype]
        self.granularity = granularity
        self.tuned: list[Tuned] = []
        self.base: dict[str, torch.Tensor] = {}  # tuned tensors' theta0, on the device
        self.fixed: dict[str, torch.Tensor] = {}  # every other tensor, merged once
        self.groups: list[str] = []
        self.models: list[str] | None = None
        start: dict[int, list[float]] = {}
        for job in plan.jobs:
            if job.method in TUNABLE and job.base is not None and job.inputs:
                _check_tunable(job)
                self._add_tuned(job, start)
            else:
                self.fixed[job.name] = self._merge_once(job)
        if not self.tuned:
            raise MergeCliError(
                "nothing to tune: no tensor is merged with task_arithmetic or ties; "
                "tune starts from a recipe whose method is task_arithmetic or ties"
            )
        self.start = torch.tensor([start[g] for g in range(len(self.groups))], dtype=torch.float64)

    # -- setup ----------------------------------------------------------------------------------
    def _read(self, job: TensorJob):
        ck = self.plan.models
        base = ck[job.base.model].checkpoint.read(job.base.name).to(self.device, self.dtype)
        xs = [ck[i.model].checkpoint.read(i.name).to(self.device, self.dtype) for i in job.inputs]
        return base, xs

    def _add_tuned(self, job: TensorJob, start: dict[int, list[float]]) -> None:
        labels = [self.plan.models[i.model].label for i in job.inputs]
        if self.models is None:  # distinct: the recipe refuses two models of one name
            self.models = labels
        elif labels != self.models:
            raise MergeCliError(
                f"tensor '{job.name}' merges models {labels} but others merge {self.models}; "
                "tune needs the same source models for every tuned tensor"
            )
        key = group_key(job, self.granularity)
        if key not in self.groups:
            self.groups.append(key)
        g = self.groups.index(key)
        w = [float(x) for x in job.weights]
        if g in start and start[g] != w:
            raise MergeCliError(
                f"tensor '{job.name}': the recipe gives weights {w} but other tensors of group '{key}' have "
                f"{start[g]}; one coefficient per group needs equal starting weights (use a finer --granularity)"
            )
        start[g] = w
        p = _params(job)
        base, xs = self._read(job)
        taus = [x - base for x in xs]
        t = Tuned(job.name, g, job.method, taus, float(p.lambda_))
        if job.method == "task_arithmetic":
            t.normalize = bool(p.normalize)
        else:
            cut = trim_sorted if mergekit_numerics(p) else trim
            trimmed = [cut(tau, d) for tau, d in zip(taus, p.density)]
            t.mean, t.reelect = p.merge_func == "mean", bool(p.weighted_election)
            if not t.reelect:  # the election ignores the weights: zero the disagreeing entries once
                sign = elect(trimmed, w, False)
                trimmed = [v * ((v * sign) > 0) for v in trimmed]
            t.vectors = trimmed
        self.base[job.name] = base
        self.tuned.append(t)

    def _merge_once(self, job: TensorJob) -> torch.Tensor:
        spec = METHODS[job.method]
        if spec.stats is not None and spec.stats.applies(job.params):
            raise MergeCliError(
                f"tensor '{job.name}': method {job.method} needs whole-model statistics; tune cannot hold it fixed"
            )
        refs = ([job.base] if job.base else []) + job.inputs
        xs = [self.plan.models[r.model].checkpoint.read(r.name) for r in refs]
        if job.method == "passthrough" and job.params.get("scale", 1.0) == 1.0:
            x = xs[-1].to(self.device)  # the model computes in the compute dtype (float: exact round trip)
            return x.to(self.dtype) if x.is_floating_point() else x
        xs = [x.to(self.device, self.dtype) for x in xs]
        base, inputs = (xs[0], xs[1:]) if job.base else (None, xs)
        ctx = TensorCtx(name=job.name, layer=job.layer, group=job.group, seed=self.plan.recipe.seed)
        ctx.device, ctx.shape, ctx.num_layers = self.device, tuple(job.shape), self.plan.num_layers
        with torch.no_grad():
            return spec.kernel(base, inputs, list(job.weights), _params(job), ctx)

    # -- the merge --------------------------------------------------------------------------------
    def merged(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tuned tensors for coefficients coeffs[G, K] (differentiable in coeffs)."""
        c = coeffs.to(self.device)
        return {t.name: self._one(t, c[t.group]) for t in self.tuned}

    def _one(self, t: Tuned, w: torch.Tensor) -> torch.Tensor:
        base = self.base[t.name]
        ws = [w[k].to(self.dtype) for k in range(len(t.vectors))]
        vs = t.vectors
        if t.reelect:  # ties, weighted election: the sign follows the current weights (no gradient)
            sign = elect(vs, [float(x) for x in w.detach()], True)
            vs = [v * ((v * sign) > 0) for v in vs]
        acc = _wsum(vs, ws, self.dtype)
        if t.method == "task_arithmetic":
            if t.normalize:
                s = w.sum()
                acc = acc / torch.where(s.abs() >= 1e-8, s, torch.ones_like(s)).to(self.dtype)
            return base + t.lam * acc
        if t.mean:
            den = _wsum([(v != 0).to(self.dtype) for v in vs], ws, self.dtype)
            if bool((w > 0).all()):
                den = den.clamp(min=torch.finfo(den.dtype).tiny)
            else:
                den = torch.where(den == 0, torch.ones_like(den), den)
            acc = acc / den
        return acc * t.lam + base

    def state(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the merged model (detached), in the plan's output dtypes."""
        from merge_cli.dtypes import ST_TO_TORCH as to_torch

        with torch.no_grad():
            out = {**self.fixed, **self.merged(coeffs)}
        dt = {j.name: to_torch[j.out_dtype] for j in self.plan.jobs}
        return {n: out[n].to(dt[n]) for n in (j.name for j in self.plan.jobs)}

    def vector_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for t in self.tuned for v in t.vectors)
