"""Helpers for the reliability tests (issue 6): a very small model family, output comparison, fault injection,
and CLI runs in forked child processes that a test can SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import torch
from helpers import fine_tune_like, llama_state_dict, save_hf, write_recipe

SMALL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "vocab_size": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
SHARD = "1KB"  # about one tensor per shard: ~25 shards from 30 tensors


def small_family(root: Path) -> dict[str, Path]:
    """A base and two fine-tuned-like experts of a 3-layer, 16-wide Llama, plus a TIES recipe over them."""
    base = llama_state_dict(SMALL_CONFIG, torch.Generator().manual_seed(11))
    paths = {"base": root / "base"}
    save_hf(paths["base"], base, SMALL_CONFIG, dtype=torch.float32)
    for k in range(2):
        paths[f"e{k}"] = root / f"e{k}"
        sd = fine_tune_like(base, torch.Generator().manual_seed(200 + k), scale=0.05)
        save_hf(paths[f"e{k}"], sd, SMALL_CONFIG, dtype=torch.float32)
    paths["recipe"] = write_recipe(
        root / "ties.yaml",
        {
            "base_model": str(paths["base"]),
            "models": [
                {"model": str(paths["e0"])},
                {"model": str(paths["e1"]), "parameters": {"weight": 0.7}},
            ],
            "method": "ties",
            "parameters": {"density": 0.5},
            "shard_size": SHARD,
        },
    )
    return paths


TIMED = (
    "manifest.json",
    "merge_report.json",
    "merge_report.md",
    "merge_report.html",
)  # hold timings (or hashes of files that do)


def output_files(out: Path) -> dict[str, bytes]:
    """The bytes that must be identical between runs: every file (shards, index, config, card, lock, side
    files) except those with timings, and the report without its `engine` timing block."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in TIMED}
    report = json.loads((out / "merge_report.json").read_text())
    report.pop("engine")
    files["merge_report.json (without engine timings)"] = json.dumps(report, sort_keys=True).encode()
    return files


def assert_same_output(a: Path, b: Path) -> None:
    fa, fb = output_files(a), output_files(b)
    assert fa.keys() == fb.keys()
    diff = [k for k in fa if fa[k] != fb[k]]
    assert not diff, f"files differ: {diff}"


class FaultyFile:
    """Wraps a binary file; raises OSError(ENOSPC) once more than `budget[0]` bytes were written through any."""

    def __init__(self, f, budget: list[int]):
        self._f = f
        self._budget = budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def cli_child(argv: list[str], env: dict[str, str]) -> None:
    """Target of a forked child process: the merge-cli command line, output silenced, exit code kept."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.update(env)
    sys.argv = ["merge-cli", *argv]
    from merge_cli.cli import main

    main()


def crash_child(argv: list[str], point: str, nth: int) -> None:
    """Like cli_child, but the process dies (os._exit: no cleanup at all, as under SIGKILL) at a chosen
    point of the write path, the nth time it is reached."""
    import merge_cli.engine.resume as r
    import merge_cli.io.writer as w

    calls = [0]

    def due() -> bool:
        calls[0] += 1
        return calls[0] >= nth

    def die() -> None:
        os._exit(9)

    if point in ("before journal line", "torn journal line"):
        real_done = r.Journal.shard_done

        def shard_done(self, fname, sha, size):
            if due():
                if point == "torn journal line":
                    with open(self.path, "a") as f:
                        f.write('{"shard":"' + fname[:9])
                die()
            return real_done(self, fname, sha, size)

        r.Journal.shard_done = shard_done
    elif point == "mid shard":
        real_write = w._HashingFile.write

        def write(self, data):
            if due():
                mv = memoryview(data).cast("B")
                self.f.write(mv[: len(mv) // 2])
                self.f.flush()
                die()
            return real_write(self, data)

        w._HashingFile.write = write
    elif point == "side files":
        real_text = w.ShardedWriter.write_text

        def write_text(self, name, text):
            if name == "merge_report.json" and due():
                die()
            return real_text(self, name, text)

        w.ShardedWriter.write_text = write_text
    elif point in ("before rename", "after rename"):
        real_replace = os.replace

        def replace(src, dst):
            if point == "before rename" and str(src).endswith(".partial") and due():
                die()
            real_replace(src, dst)
            if point == "after rename" and str(src).endswith(".partial") and due():
                die()

        w.os.replace = replace
    else:
        raise ValueError(point)
    cli_child(argv, {})


def spy_whole(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count the jobs the engine computes whole from now on (in-process runs), in a one-element list; with
    stop_after=n, Ctrl-C arrives while it computes job n+1."""
    import merge_cli.engine as engine

    real, calls = engine._Compute.whole, [0]

    def whole(*a, **k):
        calls[0] += 1
        if stop_after is not None and calls[0] > stop_after:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine._Compute, "whole", whole)
    return calls


def interrupt_after(monkeypatch, n: int) -> None:
    """Ctrl-C arrives while the engine computes job n+1."""
    spy_whole(monkeypatch, n)
