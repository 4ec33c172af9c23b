"""Shared benchmark pieces: process-tree measurement, recipe writers and tool command lines.

Used by ``run.py`` and reusable by a parity harness (add ``benchmarks/`` to ``sys.path``)::

    from harness import Method, mergekit_recipe, mergekit_cmd, measure
    recipe = mergekit_recipe(Method.parse("ties:density=0.3"), base, experts)
    result = measure(mergekit_cmd(exe, write_yaml(recipe, path), out), log=out.with_suffix(".log"))

Peak memory is the peak of the **sum of RSS over the whole process tree** (the launched process and all
its descendants), sampled from ``/proc`` every ``interval`` seconds (default 50 ms). RSS counts anonymous
memory plus resident file-backed pages (e.g. mmapped safetensors); the anonymous part is tracked
separately (``peak_anon_gb``). ``maxrss_gb`` is the kernel's ``ru_maxrss`` of the launched process from
``wait4`` (the largest single process, exact but blind to siblings) as a cross-check.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

GB = 1e9

# ----------------------------------------------------------------------------------------- measurement


def _proc_tree(root: int) -> list[int]:
    """``root`` and all its live descendants, from one scan of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _rss(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of one process in bytes; (0, 0) once it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


def tree_rss(root: int) -> tuple[int, int]:
    """Summed (RSS, anonymous RSS) of a process tree, in bytes."""
    total = anon = 0
    for pid in _proc_tree(root):
        r, a = _rss(pid)
        total += r
        anon += a
    return total, anon


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_gb: float  # peak of summed RSS over the process tree (sampled)
    peak_anon_gb: float  # peak of summed anonymous RSS over the process tree (sampled)
    maxrss_gb: float  # ru_maxrss of the launched process (kernel, exact, single process)
    cpu_s: float  # user + system CPU seconds of the tree (waited-for descendants)
    samples: int
    log: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    cmd: list[str], log: Path | None = None, interval: float = 0.05, env: dict | None = None
) -> Measurement:
    """Run ``cmd`` to completion; wall time, peak tree RSS (sampled), ru_maxrss and CPU time."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
    peak = [0, 0, 0]  # rss, anon, samples
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = tree_rss(proc.pid)
            peak[0], peak[1], peak[2] = max(peak[0], rss), max(peak[1], anon), peak[2] + 1
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        if log:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    return Measurement(
        cmd=[str(c) for c in cmd],
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_gb=peak[0] / GB,
        peak_anon_gb=peak[1] / GB,
        maxrss_gb=usage.ru_maxrss * 1024 / GB,
        cpu_s=usage.ru_utime + usage.ru_stime,
        samples=peak[2],
        log=str(log) if log else None,
    )


# --------------------------------------------------------------------------------------------- recipes

TASK_METHODS = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"}
# Per-model parameter defaults when a method is named without any (``--methods ties``).
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.3},
    "dare_linear": {"density": 0.3},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
}


@dataclass(frozen=True)
class Method:
    """A merge method and its per-model parameters, e.g. ``ties:density=0.3`` (weight defaults to 1)."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Method:
        name, *kvs = text.strip().split(":")
        params = dict(DEFAULT_PARAMS.get(name, {}))
        for kv in kvs:
            key, _, value = kv.partition("=")
            params[key.strip()] = float(value)
        return cls(name, tuple(sorted(params.items())))

    @property
    def label(self) -> str:
        return ":".join([self.name, *(f"{k}={v:g}" for k, v in self.params)])

    @property
    def slug(self) -> str:
        return self.label.replace(":", "_").replace("=", "")

    @property
    def needs_base(self) -> bool:
        return self.name in TASK_METHODS

    def model_params(self) -> dict[str, float]:
        return {"weight": 1.0, **dict(self.params)}


def _models(method: Method, base: Path, experts: list[Path]) -> tuple[dict, list[dict]]:
    """(base_model entry, models list). Methods without a base average base and experts alike."""
    sources = experts if method.needs_base else [base, *experts]
    models = [{"model": str(p), "parameters": method.model_params()} for p in sources]
    return ({"base_model": str(base)} if method.needs_base else {}), models


def mergekit_recipe(
    method: Method, base: Path, experts: list[Path], dtype: str = "bfloat16", out_dtype: str = "bfloat16"
) -> dict:
    """A recipe in mergekit's schema. mergekit loads *and computes* in ``dtype``; dtype "none" leaves the key
    out (mergekit then computes in the inputs' dtype, merge-cli in float32)."""
    base_entry, models = _models(method, base, experts)
    params = {"normalize": True} if method.name != "task_arithmetic" else {}
    recipe = {"merge_method": method.name, **base_entry, "models": models}
    if params:
        recipe["parameters"] = params
    if dtype and dtype != "none":
        recipe["dtype"] = dtype
    return {**recipe, "out_dtype": out_dtype}


def native_recipe(
    method: Method, base: Path, experts: list[Path], dtype: str = "float32", out_dtype: str = "bfloat16"
) -> dict:
    """A recipe in merge-cli's native schema (``method:``; ``dtype`` is the compute dtype)."""
    base_entry, models = _models(method, base, experts)
    params = {"lambda": 1.0} if method.needs_base else {"normalize": True}
    return {**base_entry, "models": models, "method": method.name, "parameters": params} | {
        "dtype": dtype,
        "out_dtype": out_dtype,
    }


def write_yaml(data: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return path


# -------------------------------------------------------------------------------------------- commands


def mergekit_cmd(exe: Path, recipe: Path, out: Path, extra: list[str] = ()) -> list[str]:
    """mergekit-yaml with the flags the benchmark uses (no tokenizer exists in generated models)."""
    flags = ["--out-shard-size", "5B", "--lazy-unpickle", "--no-copy-tokenizer", "--random-seed", "0"]
    return [str(exe), str(recipe), str(out), *flags, *extra]


def merge_cli_cmd(exe: Path, recipe: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [str(exe), "run", str(recipe), str(out), "--quiet", "--overwrite", *extra]
