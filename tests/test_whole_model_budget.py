"""Whole-model methods under a tiny memory budget: the statistics passes read row pieces (never a whole
big tensor), big tensors are merged in row chunks, and the output, the statistics and the side files are
bitwise those of a run with a budget that holds every tensor whole. Plus the building blocks the pieces
rely on (ExactSum, colsum, read_pieces), each checked against a plain computation written here."""

import json
import math
from fractions import Fraction

import pytest
import torch
from helpers import load_output, run_cli, write_recipe

from merge_cli.io.safetensors_file import SafetensorsFile
from merge_cli.methods.wholemodel import ExactSum, colsum

CASES = {
    "pcb": {"method": "pcb", "parameters": {"density": 0.2, "clamp_quantile": 0.05}},
    "pcb_pairwise": {"method": "pcb", "parameters": {"density": 0.3, "inter": "pairwise_norm"}},
    "ties_exact": {"method": "ties", "parameters": {"granularity": "model", "density": 0.3}},
    "ties_threshold": {
        "method": "ties",
        "parameters": {"granularity": "model", "topk": "threshold", "weighted_election": True, "merge_func": "max"},
    },
    "emr": {"method": "emr"},
}  # fmt: skip
EMBED = "model.embed_tokens.weight"


@pytest.fixture
def read_log(monkeypatch):
    """Every safetensors read during a run: (tensor name, rows read, rows of the tensor)."""
    log = []
    original = SafetensorsFile.read_rows

    def spy(self, info, row_start, row_stop):
        log.append((info.name, row_stop - row_start, info.shape[0] if info.shape else 1))
        return original(self, info, row_start, row_stop)

    monkeypatch.setattr(SafetensorsFile, "read_rows", spy)
    return log


def _merge(fam, tmp_path, case, label, budget):
    recipe = write_recipe(tmp_path / f"{label}.yaml", {
        "base_model": str(fam["base"]), "models": [{"model": str(fam[f"expert{i}"])} for i in range(3)],
        **CASES[case], "dtype": "float32", "out_dtype": "float32",
    })  # fmt: skip
    out = tmp_path / label
    res = run_cli("run", recipe, out, "--quiet", "--max-memory", budget)
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "merge_report.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_budget_gives_the_whole_tensor_result_bitwise(family_bf16, tmp_path, case, read_log):
    whole, rep_whole = _merge(family_bf16, tmp_path, case, "whole", "4GB")
    whole_reads = list(read_log)
    read_log.clear()
    small, rep_small = _merge(family_bf16, tmp_path, case, "small", "32KB")
    a, b = load_output(whole), load_output(small)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the statistics (thresholds, cuts, rescalers...) and each tensor's reported figures
    assert rep_small["engine"]["whole_model"] == rep_whole["engine"]["whole_model"]
    keys = ("kept_fraction", "sign_conflict_rate")
    for tw, ts in zip(rep_whole["tensors"], rep_small["tensors"]):
        assert tw["name"] == ts["name"] and {k: tw.get(k) for k in keys} == {k: ts.get(k) for k in keys}
    if case == "emr":
        for f in sorted((whole / "emr").iterdir()):
            assert f.read_bytes() == (small / "emr" / f.name).read_bytes(), f.name
    # the tiny budget really took the piece paths: the embedding was merged in row chunks, every
    # statistics pass read more pieces than there are tensors, and no read held the whole embedding
    chunked = {t["name"] for t in rep_small["tensors"] if t.get("chunked")}
    assert EMBED in chunked and not any(t.get("chunked") for t in rep_whole["tensors"])
    n_jobs = len(rep_small["tensors"])
    assert all(p["pieces"] > n_jobs for p in rep_small["engine"]["stats_passes"])
    assert all(p["pieces"] <= n_jobs for p in rep_whole["engine"]["stats_passes"])
    embed_rows = {rows for name, rows, total in read_log if name == EMBED}
    vocab = next(total for name, _, total in read_log if name == EMBED)
    assert embed_rows and max(embed_rows) < vocab // 4
    # the spy does see whole reads when the budget holds them
    assert any(name == EMBED and rows == total for name, rows, total in whole_reads)


# -- building blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exact_sum_is_the_exact_sum_whatever_the_split(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(20_011, generator=g, dtype=torch.float64).abs() * torch.exp(8 * torch.randn(20_011, generator=g, dtype=torch.float64))).to(dtype)  # fmt: skip
    x[:4] = torch.tensor([0.0, 1e-45, 2e-38, 7.0], dtype=torch.float64).to(dtype)  # zero, subnormals
    want = float(sum(Fraction(v) for v in x.double().tolist()))  # exact, rounded once
    for piece in (x.numel(), 777, 64, 1):
        acc = ExactSum()
        for part in torch.split(x, piece):
            acc.add(part)
        assert acc.value == want, piece
    acc = ExactSum()
    acc.add(torch.tensor([1.0, math.inf]))
    assert acc.value == math.inf
    acc.add(torch.tensor([math.nan]))
    assert math.isnan(acc.value)


@pytest.mark.parametrize("n_rows", [1, 3, 6])
def test_colsum_is_the_in_order_sum_and_does_not_depend_on_the_width(n_rows):
    g = torch.Generator().manual_seed(n_rows)
    rows = torch.randn(n_rows, 10_000, generator=g) * torch.exp(3 * torch.randn(n_rows, 10_000, generator=g))
    seq = rows[0].clone()
    for r in rows[1:]:  # ((r0 + r1) + r2) + ... in fp32
        seq = seq + r
    got = colsum(rows)
    assert got.shape == (1, 10_000) and torch.equal(got[0], seq)
    # any split into column blocks (widths that are not multiples of the vector length) gives the same
    pieces = torch.cat([colsum(rows[:, s : s + 997]) for s in range(0, 10_000, 997)], dim=1)
    assert torch.equal(pieces, got)
    half = rows.to(torch.bfloat16)
    acc = half[0].float()
    for r in half[1:]:  # 16-bit rows: accumulated in fp32, rounded once
        acc = acc + r.float()
    assert torch.equal(colsum(half)[0], acc.to(torch.bfloat16))


def test_read_pieces_cover_each_tensor_in_order(family):
    from merge_cli.engine import read_job
    from merge_cli.engine.stats import piece_elements, read_pieces
    from merge_cli.plan import build_plan
    from merge_cli.recipe import load_recipe

    recipe = write_recipe(family["base"].parent / "pieces.yaml", {
        "base_model": str(family["base"]), "models": [{"model": str(family["expert0"])}, {"model": str(family["expert2"])}],
        "method": "pcb",
    })  # fmt: skip
    plan = build_plan(load_recipe(recipe))
    assert piece_elements(plan, plan.jobs[0], None) == 1 << 22
    sizes = [piece_elements(plan, plan.jobs[0], b) for b in (1 << 30, 200_000, 1)]
    assert sizes[0] == 1 << 22 and 64 < sizes[1] < 1 << 22 and sizes[2] == 64
    for job in plan.jobs:
        base, inputs = read_job(plan, job)
        want = [t.reshape(-1) for t in [base, *inputs]]
        for piece in (64, 100, 4096, 1 << 22):
            offsets, got = [], [[] for _ in want]
            for offset, b, xs, _ in read_pieces(plan, job, piece, read_job):
                offsets.append(offset)
                for acc, t in zip(got, [b, *xs]):
                    acc.append(t)
                assert b.numel() <= piece or (offset == 0 and b.numel() == job.numel)
            assert offsets == sorted(offsets) and offsets[0] == 0
            for acc, w in zip(got, want):
                assert torch.equal(torch.cat(acc), w), (job.name, piece)
