"""The merge plan: from recipe and safetensors headers alone, every output tensor's job.

build_plan(recipe) opens every model's headers (never a weight), matches tensors across models,
classifies each into layer and module group, resolves the method and its parameters to plain numbers,
chooses the output dtype and shard, and estimates bytes and peak memory.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from merge_cli.dtypes import ITEMSIZE, ST_TO_NAME, is_float, parse_dtype_name
from merge_cli.errors import CheckpointError, PlanError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.refs import open_checkpoint
from merge_cli.io.vocab import harmonize as harmonize_vocab
from merge_cli.io.vocab import patch_config as patch_vocab_config
from merge_cli.methods import METHODS, MethodSpec, ParamSet
from merge_cli.modules import classify, layer_of, with_layer
from merge_cli.recipe import ModelEntry, Recipe, match_tensor, sources_for
from merge_cli.recipe.params import ParamResolver


@dataclass
class ModelSlot:
    label: str
    ref: str
    path: str
    checkpoint: Checkpoint = field(repr=False, compare=False)


@dataclass
class Input:
    model: int  # index into MergePlan.models
    name: str


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    method: str
    base: Input | None
    inputs: list[Input]
    weights: list[float]
    params: dict[str, Any]  # field name -> number (or tuple per model)
    layer: int | None
    group: str
    t: float
    nbytes: int
    shard: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardPlan:
    filename: str
    jobs: list[int]
    nbytes: int


@dataclass
class MergePlan:
    recipe: Recipe
    models: list[ModelSlot]
    jobs: list[TensorJob]
    shards: list[ShardPlan]
    compute_dtype: str
    out_dtype: str
    donor: int
    num_layers: int | None
    config: dict | None
    input_bytes: int
    output_bytes: int
    peak_memory_bytes: int
    notes: list[str] = field(default_factory=list)
    # filled by the engine's whole-model statistics passes (engine/stats.py): method -> what kernels get as ctx.extra
    whole_model_stats: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        for m in self.models:
            m.checkpoint.close()

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": str(self.recipe.path) if self.recipe.path else None,
            "method": self.recipe.method,
            "models": [{"label": m.label, "ref": m.ref, "path": m.path} for m in self.models],
            "donor": self.models[self.donor].label,
            "compute_dtype": ST_TO_NAME.get(self.compute_dtype, self.compute_dtype),
            "out_dtype": ST_TO_NAME.get(self.out_dtype, self.out_dtype),
            "num_layers": self.num_layers,
            "tensors": len(self.jobs),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "shards": [{"file": s.filename, "tensors": len(s.jobs), "bytes": s.nbytes} for s in self.shards],
            "notes": self.notes,
            "jobs": [
                {
                    **{k: v for k, v in asdict(j).items() if k not in ("base", "inputs", "params")},
                    "base": self.models[j.base.model].label if j.base else None,
                    "inputs": [{"model": self.models[i.model].label, "name": i.name} for i in j.inputs],
                    "params": report_params(j),
                }
                for j in self.jobs
            ],
        }


def report_params(job: TensorJob) -> dict[str, Any]:
    """A job's parameters under their recipe names (e.g. 'lambda'), lists for per-model values."""
    spec = METHODS[job.method]
    return {spec.params.key_of(k): (list(v) if isinstance(v, tuple) else v) for k, v in job.params.items()}


_NUM_RE = re.compile(r"(\d+)")


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in _NUM_RE.split(name)]


def _order_key(job: TensorJob):
    """Layers first, in order, then the tensors outside the stack (embeddings, final norm, lm_head). The
    outer tensors are the largest (often merged in row chunks after statistics passes) and shards complete
    in this order, so a run killed midway has journaled the layers before it (engine/resume.py)."""
    return (0 if job.layer is not None else 1, job.layer if job.layer is not None else 0, _natural(job.name))


class _Builder:
    def __init__(self, recipe: Recipe, allow_arch_mismatch: bool, allow_pickle: bool = False):
        self.r = recipe
        self.allow_arch_mismatch = allow_arch_mismatch
        self.allow_pickle = allow_pickle  # issue 6: pytorch_model.bin only on request, weights-only
        self.models: list[ModelSlot] = []
        self._by_ref: dict[str, int] = {}
        self.resolver = ParamResolver()
        self.jobs: list[TensorJob] = []
        self.notes: list[str] = []

    # -- models ---------------------------------------------------------------------------------
    def slot(self, ref: str, label: str | None = None) -> int:
        if ref in self._by_ref:
            return self._by_ref[ref]
        ckpt = open_checkpoint(ref, self.r.base_dir, allow_pickle=self.allow_pickle)
        for i, m in enumerate(self.models):  # the same folder under two spellings
            if m.path == str(ckpt.path):
                self._by_ref[ref] = i
                ckpt.close()
                return i
        label = label or Path(ref.rstrip("/")).name or ref
        self.models.append(ModelSlot(label, ref, str(ckpt.path), ckpt))
        self._by_ref[ref] = len(self.models) - 1
        return len(self.models) - 1

    def ckpt(self, i: int) -> Checkpoint:
        return self.models[i].checkpoint

    def check_architectures(self) -> None:
        seen: dict[str, str] = {}
        for m in self.models:
            arch = (m.checkpoint.config or {}).get("architectures")
            if arch:
                seen.setdefault(str(arch[0] if isinstance(arch, list) and arch else arch), m.label)
        if len(seen) > 1 and not self.allow_arch_mismatch:
            (a, ma), (b, mb) = list(seen.items())[:2]
            raise PlanError(
                f"models have different architectures: '{ma}' is {a} but '{mb}' is {b}; "
                "pass --allow-arch-mismatch if the tensors really line up"
            )

    # -- tensor checks --------------------------------------------------------------------------
    def input_for(self, model: int, name: str, ref_model: int, ref_name: str | None = None) -> Input:
        ck = self.ckpt(model)
        ref_info = self.ckpt(ref_model).info(ref_name or name)
        if name not in ck.tensors:
            raise PlanError(
                f"tensor '{name}' is missing from model '{self.models[model].label}' ({self.models[model].path}); "
                "all models must share the base's tensor names"
            )
        info = ck.info(name)
        if info.shape != ref_info.shape:
            a, b = self.models[model].label, self.models[ref_model].label
            msg = f"tensor '{name}': shape {list(info.shape)} in model '{a}' but {list(ref_info.shape)} in '{b}'"
            if classify(name).group in ("embed", "lm_head") and info.shape[1:] == ref_info.shape[1:]:
                msg += (
                    f" (vocabulary sizes differ: {info.shape[0]} vs {ref_info.shape[0]}); "
                    "merge models that share one tokenizer vocabulary"
                )
            else:
                msg += "; these models cannot be merged tensor by tensor"
            raise PlanError(msg)
        return Input(model, name)

    # -- jobs -----------------------------------------------------------------------------------
    def add_job(
        self,
        out_name: str,
        ref_model: int,
        ref_name: str,
        spec: MethodSpec,
        base: int | None,
        sources: list[tuple[int, str]],
        t: float,
        global_layers: list[dict | None],
        model_layers: list[list[dict | None]],
        input_names: list[str] | None = None,
    ) -> None:
        info = self.ckpt(ref_model).info(ref_name)
        cls = classify(out_name)
        if not is_float(info.dtype):  # integer / bool buffers are copied from the reference, never merged
            spec, base, sources = METHODS["passthrough"], None, [(ref_model, ref_name)]
            global_layers, model_layers = [], [[]]
        elif spec.needs_base and base is None:
            raise PlanError(f"tensor '{out_name}': method '{spec.name}' needs a base model")
        inputs = [self.input_for(m, n, ref_model, ref_name) for m, n in sources]
        with_base = spec.needs_base or (spec.optional_base and base is not None)
        base_in = self.input_for(base, ref_name, ref_model, ref_name) if with_base else None
        params = self.resolver.resolve(spec, out_name, t, global_layers, model_layers, input_names)
        if spec.check is not None:
            problem = spec.check(params, len(inputs))
            if problem:
                raise PlanError(f"tensor '{out_name}' ({spec.name}): {problem}")
        weights = list(params.weight) if "weight" in spec.params.per_model_fields() else [1.0] * len(inputs)
        out_dtype = self.out_dtype if is_float(info.dtype) else info.dtype
        self.jobs.append(
            TensorJob(
                name=out_name,
                shape=info.shape,
                out_dtype=out_dtype,
                method=spec.name,
                base=base_in,
                inputs=inputs,
                weights=weights,
                params={k: v for k, v in params.as_dict().items()},
                layer=cls.layer,
                group=cls.group,
                t=t,
                nbytes=math.prod(info.shape) * ITEMSIZE[out_dtype],
            )
        )

    def choose_out_dtype(self, ref: int) -> str:
        if self.r.out_dtype:
            return parse_dtype_name(self.r.out_dtype, self.r.where(("out_dtype",)))
        by_bytes: Counter = Counter()
        for info in self.ckpt(ref).tensors.values():
            if is_float(info.dtype):
                by_bytes[info.dtype] += info.nbytes
        return by_bytes.most_common(1)[0][0] if by_bytes else "F32"

    def override_for(self, name: str, group: str, layer: int | None):
        for o in self.r.overrides:
            if o.layers is not None and (layer is None or not o.layers[0] <= layer < o.layers[1]):
                continue
            if match_tensor(o.patterns, name, group):
                return o
        return None

    # -- recipes with `models:` -------------------------------------------------------------------
    def build_models(self) -> tuple[int, int | None]:
        r = self.r
        base = self.slot(r.base_model, "base") if r.base_model else None
        entry_slot: dict[int, int] = {}
        for i, m in enumerate(r.models):
            entry_slot[i] = self.slot(m.model, m.label)
        ref = base if base is not None else entry_slot[0]
        self.check_architectures()
        self.vocab_size = harmonize_vocab(
            self.models, ref, r.vocab, self.notes
        )  # issue 7: merge_cli/io/vocab.py
        self.out_dtype = self.choose_out_dtype(ref)
        ref_ck = self.ckpt(ref)
        num_layers = ref_ck.num_layers()
        if num_layers is None:
            layers = [x for x in (layer_of(n) for n in ref_ck.tensors) if x is not None]
            num_layers = max(layers) + 1 if layers else None
        index_of = {id(m): i for i, m in enumerate(r.models)}
        for name in ref_ck.tensors:
            cls = classify(name)
            t = (
                cls.layer / (num_layers - 1)
                if (cls.layer is not None and num_layers and num_layers > 1)
                else 0.0
            )
            o = self.override_for(name, cls.group, cls.layer)
            spec = METHODS[o.method] if (o and o.method) else METHODS[r.method]
            entries: list[ModelEntry] = sources_for(r, spec)
            if spec.name == "passthrough" and not o:
                entries = entries[:1]
            sources = [(entry_slot[index_of[id(e)]], name) for e in entries]
            if o:
                global_layers = [o.parameters, r.parameters]
                model_layers = [
                    [o.model_parameters.get(e.label), o.parameters, e.parameters] for e in entries
                ]
            else:
                global_layers = [r.parameters]
                model_layers = [[e.parameters] for e in entries]
            self.add_job(name, ref, name, spec, base, sources, t, global_layers, model_layers)
        extra = set()
        for slot in entry_slot.values():
            extra |= set(self.ckpt(slot).tensors) - set(ref_ck.tensors)
        if extra:
            self.notes.append(
                f"{len(extra)} tensor(s) present only in source models were not merged (e.g. '{sorted(extra)[0]}')"
            )
        return ref, num_layers

    # -- recipes with `slices:` -------------------------------------------------------------------
    def build_slices(self) -> tuple[int, int | None]:
        r = self.r
        base = self.slot(r.base_model, "base") if r.base_model else None
        for s in r.slices:
            for src in s.sources:
                self.slot(src.model)
        ref = base if base is not None else self.slot(r.slices[0].sources[0].model)
        self.check_architectures()
        self.out_dtype = self.choose_out_dtype(ref)
        top = METHODS[r.method]
        offset = 0
        for si, s in enumerate(r.slices):
            spec = METHODS[s.method] if s.method else top
            n = s.sources[0].layers[1] - s.sources[0].layers[0]
            slots = [self.slot(src.model) for src in s.sources]
            for slot, src in zip(slots, s.sources):
                have = self.ckpt(slot).num_layers()
                if have is not None and src.layers[1] > have:
                    raise PlanError(
                        f"slice {si}: layers {list(src.layers)} of model '{self.models[slot].label}' go past its {have} layers"
                    )
            first = s.sources[0]
            tmpl_slot = slots[0]
            for j in range(n):
                l0 = first.layers[0] + j
                names = [nm for nm in self.ckpt(tmpl_slot).tensors if layer_of(nm) == l0]
                if not names:
                    raise PlanError(
                        f"slice {si}: model '{self.models[tmpl_slot].label}' has no tensors for layer {l0}"
                    )
                t = j / (n - 1) if n > 1 else 1.0  # a one-layer slice sits at t = 1 (as in mergekit)
                for name in names:
                    pairs = [
                        (slot, with_layer(name, l0, src.layers[0] + j)) for slot, src in zip(slots, s.sources)
                    ]
                    self.add_slice_job(si, s, spec, base, slots, pairs, with_layer(name, l0, offset + j), t)
            offset += n
        # tensors outside the layer stack (embeddings, final norm, head): from the reference model, or
        # (outer_tensors: slices) merged over the first slice's sources (embeddings) / the last slice's
        ref_ck = self.ckpt(ref)
        for name in ref_ck.tensors:
            if layer_of(name) is not None:
                continue
            if r.outer_tensors == "slices":
                si = 0 if classify(name).group == "embed" else len(r.slices) - 1
                s = r.slices[si]
                slots = [self.slot(src.model) for src in s.sources]
                spec = METHODS[s.method] if s.method else top
                self.add_slice_job(si, s, spec, base, slots, [(slot, name) for slot in slots], name, 0.0)
                continue
            self.add_job(name, ref, name, METHODS["passthrough"], None, [(ref, name)], 0.0, [], [[]])
        return ref, offset

    def add_slice_job(self, si, s, spec, base, slots, pairs, out_name, t) -> None:
        """One output tensor of slice `si`: pairs = (model slot, input name) per source, in source order."""
        src_params = [src.parameters for src in s.sources]
        base_in = None
        if spec.needs_base or (spec.optional_base and base is not None and base in slots):
            if base is None or base not in slots:
                raise PlanError(
                    f"slice {si}: method '{spec.name}' needs the base model among the slice's sources"
                )
            k = slots.index(base)
            base_in, pairs, src_params = (
                pairs[k],
                pairs[:k] + pairs[k + 1 :],
                src_params[:k] + src_params[k + 1 :],
            )
        ref_slot, ref_name = base_in if base_in else pairs[0]
        self.add_job(
            out_name, ref_slot, ref_name, spec, base_in[0] if base_in else None, pairs, t,
            [s.parameters, self.r.parameters], [[p] for p in src_params], [nm for _, nm in pairs],
        )  # fmt: skip

    def donor(self, ref: int) -> int:
        d = self.r.donor
        if d is None or d == "base":
            return ref
        for i, m in enumerate(self.models):
            if d in (m.label, m.ref):
                return i
        return ref


def _output_config(ck: Checkpoint, out_dtype: str, num_layers: int | None, sliced: bool) -> dict | None:
    if ck.config is None:
        return None
    cfg = dict(ck.config)
    name = ST_TO_NAME.get(out_dtype)
    if name:
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = name
    if sliced and num_layers is not None:
        old = ck.num_layers()
        for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if k in cfg:
                cfg[k] = num_layers
        if isinstance(cfg.get("layer_types"), list) and old and len(cfg["layer_types"]) == old:
            cfg.pop("layer_types")  # per-layer lists no longer line up; the model's defaults rebuild them
    return cfg


def assign_shards(jobs: list[TensorJob], shard_bytes: int) -> list[ShardPlan]:
    groups: list[list[int]] = [[]]
    sizes = [0]
    for i, job in enumerate(jobs):
        if groups[-1] and sizes[-1] + job.nbytes > shard_bytes:
            groups.append([])
            sizes.append(0)
        groups[-1].append(i)
        sizes[-1] += job.nbytes
    n = len(groups)
    shards = []
    for k, (g, size) in enumerate(zip(groups, sizes)):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        shards.append(ShardPlan(fname, g, size))
        for i in g:
            jobs[i].shard = k
    return shards


def estimate_peak(jobs: list[TensorJob], models: list[ModelSlot], compute_bytes: int) -> int:
    """Working set of the largest job: inputs as read, each in compute dtype, two temporaries, the output,
    plus the next job's inputs being read ahead."""
    peak = 0
    for job in jobs:
        n_in = len(job.inputs) + (1 if job.base else 0)
        read = sum(models[i.model].checkpoint.info(i.name).nbytes for i in job.inputs)
        work = job.numel * compute_bytes * (n_in + 2) + job.nbytes
        peak = max(peak, 2 * read + work)
    return peak


def check_methods(jobs: list[TensorJob], num_layers: int | None, notes: list[str]) -> None:
    """Plan-time checks over all of a method's jobs (MethodSpec.plan_check), e.g. whole-model parameters;
    notes the whole-model statistics passes the merge will run first (merge_cli/engine/stats.py)."""
    by_method: dict[str, list[ParamSet]] = {}
    for j in jobs:
        by_method.setdefault(j.method, []).append(
            ParamSet({k: (tuple(v) if isinstance(v, list) else v) for k, v in j.params.items()})
        )
    for name, params in by_method.items():
        check = METHODS[name].plan_check
        problem = check(params, num_layers) if check else None
        if problem:
            raise PlanError(f"method '{name}': {problem}")
        stats = METHODS[name].stats
        whole = [ps for ps in params if stats is not None and stats.applies(ps)]
        if whole:
            rounds = stats.rounds_for(whole[0])
            notes.append(
                f"{name}: {len(rounds)} whole-model statistics pass(es) over {len(whole)} tensor(s) before the "
                "merge: " + "; ".join(rounds)
            )


def build_plan(
    recipe: Recipe,
    *,
    allow_arch_mismatch: bool = False,
    shard_size: int | None = None,
    allow_pickle: bool = False,
) -> MergePlan:
    b = _Builder(recipe, allow_arch_mismatch, allow_pickle)
    try:
        ref, num_layers = b.build_slices() if recipe.slices else b.build_models()
        check_methods(b.jobs, num_layers, b.notes)
    except (PlanError, CheckpointError):
        for m in b.models:
            m.checkpoint.close()
        raise
    b.jobs.sort(key=_order_key)
    shards = assign_shards(b.jobs, shard_size or recipe.shard_bytes())
    compute = parse_dtype_name(recipe.dtype, recipe.where(("dtype",)))
    donor = b.donor(ref)
    cfg = _output_config(b.ckpt(donor), b.out_dtype, num_layers, bool(recipe.slices))
    cfg = patch_vocab_config(cfg, getattr(b, "vocab_size", None))
    input_bytes = sum(
        b.ckpt(i.model).info(i.name).nbytes for j in b.jobs for i in ([j.base] if j.base else []) + j.inputs
    )
    return MergePlan(
        recipe=recipe,
        models=b.models,
        jobs=b.jobs,
        shards=shards,
        compute_dtype=compute,
        out_dtype=b.out_dtype,
        donor=donor,
        num_layers=num_layers,
        config=cfg,
        input_bytes=input_bytes,
        output_bytes=sum(j.nbytes for j in b.jobs),
        peak_memory_bytes=estimate_peak(b.jobs, b.models, ITEMSIZE[compute]),
        notes=b.notes,
    )
