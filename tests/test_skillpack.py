"""SkillPacks (issue 16): round trip within the reported error, lossless settings, forget-free removal,
PEFT export, hostile packs, streamed = in-memory, quantization against an independent implementation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_cli.skillpack.extract import compress_state_dict
from merge_cli.skillpack.format import Pack
from merge_cli.skillpack.quant import dequantize_rows, pack_bits, quantize_rows, unpack_bits
from merge_cli.skillpack.settings import with_overrides
from tests.helpers import load_output, run_cli, tiny_family, write_recipe


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("spfam")
    return tiny_family(root, 2, dtype=torch.float32) | {"root": root}


@pytest.fixture(scope="module")
def fam16(tmp_path_factory):
    root = tmp_path_factory.mktemp("spfam16")
    return tiny_family(root, 2, dtype=torch.bfloat16) | {"root": root}


@pytest.fixture(scope="module")
def default_pack(fam, tmp_path_factory):
    """One default pack of expert0, extracted once; tests copy it before editing."""
    return _extract(fam["base"], fam["expert0"], tmp_path_factory.mktemp("sppack") / "good.skillpack")


def _extract(base, ft, out, *extra):
    r = run_cli("pack", "extract", base, ft, out, "-q", *extra)
    assert r.exit_code == 0, r.output
    return out


def _bad(result) -> str:
    """A user error: exit 2 and exactly one 'error:' line, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# -- quantization ---------------------------------------------------------------------------------
def _ref_quant(x: np.ndarray, bits: int):
    """Textbook asymmetric RTN per row, written independently with numpy (range forced to hold 0)."""
    qmax = 2**bits - 1
    qs, scales, zeros = [], [], []
    for row in x.astype(np.float32):
        lo, hi = np.float32(min(row.min(), 0)), np.float32(max(row.max(), 0))
        scale = np.float32((hi - lo) / np.float32(qmax))
        if scale == 0:
            scale = np.float32(1)
        zero = np.clip(np.rint(-lo / scale), 0, qmax)
        qs.append(np.clip(np.rint(row / scale) + zero, 0, qmax).astype(np.uint8))
        scales.append(scale)
        zeros.append(zero)
    return np.stack(qs), np.array(scales, np.float32), np.array(zeros, np.uint8)


def _ref_pack(q: np.ndarray, bits: int) -> bytes:
    """Bit by bit, least significant first, into a little-endian bit stream."""
    flat = [int(v) for v in q.reshape(-1)]
    out = bytearray((len(flat) * bits + 7) // 8)
    pos = 0
    for v in flat:
        for b in range(bits):
            if (v >> b) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return bytes(out)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_matches_independent_implementation(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(7, 37, generator=g)
    x[3] = x[3].abs() + 0.5  # an all-positive row: the range is widened to hold 0
    x[5] = 0.0  # an all-zero row
    q, scale, zero = quantize_rows(x, bits)
    rq, rs, rz = _ref_quant(x.numpy(), bits)
    assert (
        np.array_equal(q.numpy(), rq)
        and np.array_equal(scale.numpy(), rs)
        and np.array_equal(zero.numpy(), rz)
    )
    packed = pack_bits(q, bits)
    assert packed.numpy().tobytes() == _ref_pack(rq, bits)
    assert torch.equal(unpack_bits(packed, bits, q.numel()).reshape(q.shape), q)
    err = (dequantize_rows(q, scale, zero) - x).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())  # round to nearest: at most half a step


# -- round trip -----------------------------------------------------------------------------------
def test_round_trip_within_reported_error(fam, tmp_path):
    pack = _extract(fam["base"], fam["expert0"], tmp_path / "e0.skillpack", "--beta", "0.8")
    r = run_cli("pack", "apply", fam["base"], pack, tmp_path / "g", "-q")
    assert r.exit_code == 0, r.output
    out, base, ft = load_output(tmp_path / "g"), load_output(fam["base"]), load_output(fam["expert0"])
    meta = Pack(pack)
    try:
        for name, e in meta.tensors.items():
            delta = ft[name].double() - base[name].double()
            got = (
                out[name].double() - ft[name].double()
            ).norm() / delta.norm()  # measured here, independently
            assert abs(float(got) - e["rel_error"]) < 1e-4, (name, float(got), e["rel_error"])
        schemes = {e["group"]: e["scheme"] for e in meta.tensors.values()}
        assert schemes == {
            "embed": "prune",
            "attention": "svd",
            "mlp": "svd",
            "norm": "dense",
            "lm_head": "prune",
        }
        ranks = [e["rank"] for e in meta.tensors.values() if e["scheme"] == "svd"]
        assert all(0 < k < 64 for k in ranks)
    finally:
        meta.close()
    info = json.loads(run_cli("pack", "inspect", pack, "--json").stdout)
    assert info["bytes"] == pack.stat().st_size and info["compression_ratio"] > 1
    assert {g["group"] for g in info["groups"]} == {"embed", "attention", "mlp", "norm", "lm_head"}


def test_lossless_settings_reproduce_the_delta(fam, tmp_path):
    """beta = 1, 16-bit factors, nothing pruned: the graft is the fine-tune within bf16 tolerance."""
    pack = _extract(fam["base"], fam["expert1"], tmp_path / "e1.skillpack", "--beta", "1", "--bands", "16:rest",
                    "--keep", "1")  # fmt: skip
    assert run_cli("pack", "apply", fam["base"], pack, tmp_path / "g", "-q").exit_code == 0
    out, base, ft = load_output(tmp_path / "g"), load_output(fam["base"]), load_output(fam["expert1"])
    for name in base:
        delta = (ft[name] - base[name]).double()
        err = (out[name].double() - ft[name].double()).norm()
        assert err <= 2**-7 * delta.norm() + 1e-7, (name, float(err), float(delta.norm()))


def test_streamed_extraction_equals_in_memory(fam, tmp_path):
    """Row blocks of a few rows (tiny --max-memory) give bitwise the tensors of whole-tensor compression."""
    pack = _extract(fam["base"], fam["expert0"], tmp_path / "s.skillpack", "--max-memory", "200KB",
                    "--set", "other.scheme=prune", "--set", "norm.scheme=dense")  # fmt: skip
    settings = with_overrides({"other": {"scheme": "prune"}})
    entries, tensors = compress_state_dict(load_output(fam["base"]), load_output(fam["expert0"]), settings)
    got = load_file(str(pack))
    assert set(got) == set(tensors)
    for key, t in tensors.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    with safe_open(str(pack), "pt") as f:
        meta = json.loads(f.metadata()["skillpack"])
    for name, e in entries.items():
        assert meta["tensors"][name]["scheme"] == e["scheme"]
        assert math.isclose(meta["tensors"][name]["rel_error"], e["rel_error"], rel_tol=1e-6, abs_tol=1e-9)


def test_svd_too_big_for_the_budget_is_refused(fam, tmp_path):
    line = _bad(
        run_cli(
            "pack",
            "extract",
            fam["base"],
            fam["expert0"],
            tmp_path / "x.skillpack",
            "--max-memory",
            "1KB",
            "-q",
        )
    )
    assert "--max-memory" in line and not (tmp_path / "x.skillpack").exists()
    assert not list(tmp_path.iterdir())  # no partial files left behind


# -- forget-free ----------------------------------------------------------------------------------
def test_apply_then_remove_gives_the_base_bitwise(fam16, tmp_path):
    p0 = _extract(fam16["base"], fam16["expert0"], tmp_path / "p0.skillpack")
    p1 = _extract(fam16["base"], fam16["expert1"], tmp_path / "p1.skillpack")
    base = load_output(fam16["base"])
    assert run_cli("pack", "apply", fam16["base"], p0, tmp_path / "g0", "-q").exit_code == 0
    g0 = load_output(tmp_path / "g0")
    assert any(not torch.equal(g0[n], base[n]) for n in base)  # the graft did change the model
    assert run_cli("pack", "remove", tmp_path / "g0", p0, tmp_path / "r0").exit_code == 0
    r0 = load_output(tmp_path / "r0")
    assert set(r0) == set(base) and all(torch.equal(r0[n], base[n]) for n in base)
    # two packs, remove one: bitwise what the other alone gives
    assert run_cli("pack", "apply", fam16["base"], p0, p1, tmp_path / "g01", "-q").exit_code == 0
    assert run_cli("pack", "remove", tmp_path / "g01", p1, tmp_path / "r01").exit_code == 0
    r01 = load_output(tmp_path / "r01")
    assert all(torch.equal(r01[n], g0[n]) for n in base)
    # no pack at all, or a weight of 0: the base
    assert run_cli("pack", "apply", fam16["base"], tmp_path / "none", "-q").exit_code == 0
    assert all(torch.equal(load_output(tmp_path / "none")[n], base[n]) for n in base)
    assert (
        run_cli("pack", "apply", fam16["base"], p0, tmp_path / "w0", "--weights", "p0=0", "-q").exit_code == 0
    )
    assert all(torch.equal(load_output(tmp_path / "w0")[n], base[n]) for n in base)
    assert (tmp_path / "g0" / "config.json").is_file() and (tmp_path / "g0" / "tokenizer.json").is_file()


def test_sum_of_two_packs_is_base_plus_both_deltas(fam, tmp_path):
    p0 = _extract(fam["base"], fam["expert0"], tmp_path / "math.skillpack")
    p1 = _extract(fam["base"], fam["expert1"], tmp_path / "code.skillpack")
    r = run_cli("pack", "apply", fam["base"], p0, p1, tmp_path / "g", "--weights", "math=1,code=0.5", "-q")
    assert r.exit_code == 0, r.output
    out, base = load_output(tmp_path / "g"), load_output(fam["base"])
    a, b = Pack(p0), Pack(p1)
    try:
        for n in base:
            want = base[n] + a.delta(n) + 0.5 * b.delta(n)
            assert torch.allclose(out[n], want, atol=1e-6), n
    finally:
        a.close()
        b.close()
    # any merge method over the decompressed models, through the engine
    r = run_cli(
        "pack", "apply", fam["base"], p0, p1, tmp_path / "t", "--method", "ties", "--param", "density=0.5"
    )
    assert r.exit_code == 0, r.output
    assert (
        set(load_output(tmp_path / "t")) == set(base) and (tmp_path / "t" / "skillpack_graft.json").is_file()
    )


@pytest.mark.parametrize("style", ["plus", "pack_key", "mergekit_plus", "mergekit_pack_key"])
def test_pack_as_recipe_source(fam, tmp_path, style):
    p0 = _extract(fam["base"], fam["expert0"], tmp_path / "math.skillpack")
    assert run_cli("pack", "apply", fam["base"], p0, tmp_path / "g", "-q").exit_code == 0
    plus = style.endswith("plus")
    model = (
        {"model": f"{fam['base']}+./math.skillpack"}
        if plus
        else {"model": str(fam["base"]), "pack": "./math.skillpack"}
    )
    key = "merge_method" if style.startswith("mergekit") else "method"
    recipe = write_recipe(tmp_path / "r.yaml", {
        key: "linear", "dtype": "float32", "models": [{**model, "parameters": {"weight": 1.0}}],
    })  # fmt: skip
    r = run_cli("run", recipe, tmp_path / "m", "-q")
    assert r.exit_code == 0, r.output
    got, want = load_output(tmp_path / "m"), load_output(tmp_path / "g")
    assert all(torch.equal(got[n], want[n]) for n in want)


# -- PEFT -----------------------------------------------------------------------------------------
def test_export_lora_loads_in_peft(fam, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    pack = _extract(fam["base"], fam["expert0"], tmp_path / "e0.skillpack", "--bands", "8:4,4:rest")
    r = run_cli("pack", "export-lora", pack, tmp_path / "lora")
    assert r.exit_code == 0, r.output
    model = transformers.LlamaForCausalLM.from_pretrained(str(fam["base"]), torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "lora")).merge_and_unload()
    sd = merged.state_dict()
    base = load_output(fam["base"])
    p = Pack(pack)
    try:
        svd = [n for n, e in p.tensors.items() if e["scheme"] == "svd"]
        assert len(svd) == 28
        for n in svd:
            assert torch.allclose(sd[n], base[n] + p.delta(n), atol=2e-6), n
        for n, e in p.tensors.items():
            if e["scheme"] != "svd":
                assert torch.equal(sd[n], base[n]), n  # pruned / dense tensors have no LoRA form
    finally:
        p.close()
    r = run_cli("pack", "extract", fam["base"], fam["expert0"], tmp_path / "direct", "--format", "peft", "-q",
                "--bands", "8:4,4:rest")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (
        load_file(str(tmp_path / "direct" / "adapter_model.safetensors")).keys()
        == load_file(str(tmp_path / "lora" / "adapter_model.safetensors")).keys()
    )


# -- hostile / mismatched packs -------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, edit) -> Path:
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        md = dict(f.metadata())
    meta = json.loads(md["skillpack"])
    edit(meta, tensors)
    md["skillpack"] = json.dumps(meta)
    save_file(tensors, str(dst), metadata=md)
    return dst


def _set_scheme(meta, tensors):
    meta["tensors"]["model.norm.weight"]["scheme"] = "wavelet"


def _set_version(meta, tensors):
    meta["version"] = 99


def _bad_shape(meta, tensors):
    name = next(n for n, e in meta["tensors"].items() if e["scheme"] == "svd")
    tensors[f"{name}::S"] = torch.zeros(1)


def _bad_index(meta, tensors):
    tensors["model.embed_tokens.weight::idx"][3, 0] = 30000


def _nan_scale(meta, tensors):
    key = next(k for k in tensors if k.endswith(".scale"))
    tensors[key][0] = float("nan")


@pytest.mark.parametrize("case", ["wrong_base", "wrong_shapes", "scheme", "version", "tensor_shape", "truncated",
                                  "bad_index", "nan", "not_a_pack", "missing", "damp", "no_text"])  # fmt: skip
def test_bad_packs_give_one_line_and_exit_2(fam, default_pack, tmp_path, case):
    good = tmp_path / "good.skillpack"
    good.write_bytes(default_pack.read_bytes())
    base = fam["base"]
    extra: list = []
    if case == "wrong_base":
        base = fam["expert1"]
        want = "another base"
    elif case == "wrong_shapes":
        from tests.helpers import TINY_CONFIG, llama_state_dict, save_hf

        cfg = dict(TINY_CONFIG, intermediate_size=96)
        save_hf(
            tmp_path / "other",
            llama_state_dict(cfg, torch.Generator().manual_seed(1)),
            cfg,
            dtype=torch.float32,
        )
        base, extra, want = tmp_path / "other", ["--skip-base-check"], "in base"
    elif case == "scheme":
        good, want = _rewrite(good, tmp_path / "s.skillpack", _set_scheme), "unknown scheme"
    elif case == "version":
        good, want = _rewrite(good, tmp_path / "v.skillpack", _set_version), "version 99"
    elif case == "tensor_shape":
        good, want = _rewrite(good, tmp_path / "t.skillpack", _bad_shape), "metadata says"
    elif case == "bad_index":
        good, want = _rewrite(good, tmp_path / "i.skillpack", _bad_index), "outside [0, 64)"
    elif case == "nan":
        good, want = _rewrite(good, tmp_path / "n.skillpack", _nan_scale), "NaN or Inf"
    elif case == "truncated":
        data = good.read_bytes()
        good.write_bytes(data[: len(data) // 2])
        want = "truncated"
    elif case == "not_a_pack":
        good, want = fam["base"] / "model.safetensors", "not a SkillPack"
    elif case == "missing":
        good, want = tmp_path / "nope.skillpack", "no such file"
    if case in ("damp", "no_text"):
        extra = ["--damp", "0"] if case == "damp" else ["--calibration", tmp_path / "missing.txt"]
        line = _bad(run_cli("pack", "extract", base, fam["expert0"], tmp_path / "c.skillpack", "-q", *extra))
        assert ("damping must be positive" if case == "damp" else "missing.txt: unreadable") in line
        assert not (tmp_path / "c.skillpack").exists()
        return
    line = _bad(run_cli("pack", "apply", base, good, tmp_path / "out", *extra))
    assert want in line, line
    assert not (tmp_path / "out").exists()


# -- pack recipe, Twin-Merging --------------------------------------------------------------------
def test_extract_from_a_pack_recipe(fam, tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", {
        "base": str(fam["base"]), "finetuned": str(fam["expert0"]),
        "groups": {"mlp": {"rank": 5, "bands": "16:rest"}, "embed": {"scheme": "skip"}},
    })  # fmt: skip
    assert run_cli("pack", "extract", "--recipe", recipe, tmp_path / "r.skillpack", "-q").exit_code == 0
    p = Pack(tmp_path / "r.skillpack")
    try:
        assert {e["rank"] for e in p.tensors.values() if e["group"] == "mlp"} == {5}
        assert p.tensors["model.embed_tokens.weight"]["scheme"] == "skip"
        assert p.tensors["model.embed_tokens.weight"]["rel_error"] == 1.0
    finally:
        p.close()
    bad = write_recipe(tmp_path / "b.yaml", {"base": "x", "finetuned": "y", "groups": {"mlp": {"rnak": 3}}})
    assert "unknown knob 'rnak'" in _bad(
        run_cli("pack", "extract", "--recipe", bad, tmp_path / "b.skillpack")
    )


def test_twin_shared_plus_exclusive_packs(fam, tmp_path):
    r = run_cli(
        "pack", "twin", fam["base"], fam["expert0"], fam["expert1"], tmp_path / "twin", "--density", "1"
    )
    assert r.exit_code == 0, r.output
    base, e0, e1 = (load_output(fam[k]) for k in ("base", "expert0", "expert1"))
    shared = load_output(tmp_path / "twin" / "shared")
    for n in base:  # task arithmetic, lambda 0.3
        want = base[n] + 0.3 * ((e0[n] - base[n]) + (e1[n] - base[n]))
        assert torch.allclose(shared[n], want, atol=1e-6), n
    packs = [tmp_path / "twin" / "expert0.skillpack", tmp_path / "twin" / "expert1.skillpack"]
    r = run_cli(
        "pack",
        "apply",
        tmp_path / "twin" / "shared",
        *packs,
        tmp_path / "t0",
        "--weights",
        "expert0=1,expert1=0",
    )
    assert r.exit_code == 0, r.output
    got = load_output(tmp_path / "t0")
    for n in base:  # full density, fp32 factors: theta* + v_0 is expert 0
        assert torch.allclose(got[n], e0[n], atol=2e-5), n
    r = run_cli("pack", "twin", fam["base"], fam["expert0"], tmp_path / "twin10", "--density", "0.1")
    assert r.exit_code == 0, r.output
    p = Pack(tmp_path / "twin10" / "expert0.skillpack")
    try:
        for e in p.tensors.values():
            if len(e["shape"]) == 2:
                assert e["scheme"] == "svd" and e["rank"] == int(0.1 * min(e["shape"]))
    finally:
        p.close()


# -- GPTQ-style compensation ----------------------------------------------------------------------
def test_gptq_on_an_uncorrelated_hessian_is_round_to_nearest():
    """With a diagonal H no error is propagated (the Cholesky factor of H^-1 is diagonal): GPTQ = RTN."""
    from merge_cli.skillpack.gptq import gptq_rows_fixed

    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    h = torch.diag(torch.rand(40, generator=torch.Generator().manual_seed(4)) + 0.5)
    assert all(
        torch.equal(a, b) for a, b in zip(gptq_rows_fixed(w, h, 3, 0.01), quantize_rows(w, 3), strict=True)
    )


def test_gptq_lowers_the_error_on_correlated_inputs():
    """tr(E H E^T), the output error on the calibration inputs, is lower than round-to-nearest's."""
    from merge_cli.skillpack.gptq import gptq_rows_fixed

    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(
        512, 64, generator=g
    )
    h = x.T @ x
    rtn = dequantize_rows(*quantize_rows(w, 2))
    gq = dequantize_rows(*gptq_rows_fixed(w, h, 2, 0.01))

    def err(e):
        return float(((e @ h) * e).sum())

    assert err(w - gq) < 0.7 * err(w - rtn)


def test_calibrated_pack_is_closer_to_the_fine_tune_on_text(fam, tmp_path):
    transformers = pytest.importorskip("transformers")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11} the" for i in range(600)))
    packs = {}
    for mode in ("rtn", "gptq"):
        extra = ["--calibration", text] if mode == "gptq" else []
        packs[mode] = _extract(fam["base"], fam["expert0"], tmp_path / f"{mode}.skillpack", "--bands", "3:4,2:rest",
                               "--keep", "1", *extra)  # fmt: skip
        assert run_cli("pack", "apply", fam["base"], packs[mode], tmp_path / mode, "-q").exit_code == 0
    p = Pack(packs["gptq"])
    try:
        assert p.meta["calibration"]["method"] == "gptq"
        assert all(e.get("calibrated") for e in p.tensors.values() if e["scheme"] == "svd")
    finally:
        p.close()
    tok = transformers.AutoTokenizer.from_pretrained(str(fam["expert0"]))
    ids = tok(text.read_text()[:2000], return_tensors="pt")["input_ids"][:, :200]

    def hidden(folder):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        with torch.no_grad():
            return m(ids, output_hidden_states=True).hidden_states[-1]

    ref = hidden(fam["expert0"])
    d_rtn, d_gptq = (float((hidden(tmp_path / m) - ref).norm()) for m in ("rtn", "gptq"))
    print(f"last hidden state distance to the fine-tune: rtn {d_rtn:.4f}, gptq {d_gptq:.4f}")
    assert d_gptq < d_rtn


def _spec_decode(path: Path) -> dict[str, np.ndarray]:
    """Every delta of a pack decoded from docs/skillpacks.md with safetensors + json + numpy alone (torch
    only to load: numpy has no bfloat16)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["skillpack"])

        def get(key):
            t = f.get_tensor(key)
            return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

        out = {}
        for name, e in meta["tensors"].items():
            shape = tuple(e["shape"])
            if e["scheme"] == "dense":
                out[name] = get(f"{name}::delta").astype(np.float64)
            elif e["scheme"] == "prune":
                idx, val = get(f"{name}::idx").astype(np.int64), get(f"{name}::val").astype(np.float64)
                d = np.zeros((shape[0], int(np.prod(shape[1:]))))
                np.put_along_axis(d, idx, val, axis=1)
                out[name] = d.reshape(shape)
            elif e["scheme"] == "svd":
                s = get(f"{name}::S").astype(np.float64)
                d = np.zeros(shape)
                for j, b in enumerate(e["bands"]):
                    lo, hi, bits = b["start"], b["stop"], b["bits"]
                    fac = {}
                    for side, cols in (("U", shape[0]), ("V", shape[1])):
                        key = f"{name}::{side}.{j}"
                        if bits in (16, 32):
                            fac[side] = get(key).astype(np.float64)
                            continue
                        raw = get(key + ".q")
                        n = (hi - lo) * cols
                        codes = [sum(((int(raw[(k * bits + t) // 8]) >> ((k * bits + t) % 8)) & 1) << t
                                     for t in range(bits)) for k in range(n)]  # fmt: skip
                        q = np.array(codes, dtype=np.float64).reshape(hi - lo, cols)
                        sc, z = get(key + ".scale").astype(np.float64), get(key + ".zero").astype(np.float64)
                        fac[side] = (q - z[:, None]) * sc[:, None]
                    d += (fac["U"].T * s[lo:hi]) @ fac["V"]
                out[name] = d
            else:
                out[name] = np.zeros(shape)
    return out


def test_pack_is_readable_from_the_spec_alone(fam, tmp_path):
    pack = _extract(fam["base"], fam["expert0"], tmp_path / "p.skillpack", "--bands", "8:3,3:5,16:4,2:rest")
    want = _spec_decode(pack)
    p = Pack(pack)
    try:
        assert set(want) == set(p.tensors)
        for name, d in want.items():
            assert np.allclose(p.delta(name).double().numpy(), d, atol=1e-5), name
    finally:
        p.close()


@pytest.mark.parametrize(
    "field,value",
    [("rel_error", "high"), ("delta_norm", -1), ("keep", None), ("group", 3), ("rank", "7"), ("bands", {}),
     ("shape", [-1, 2]), ("kept_per_row", 0), ("dtype", ["BF16"])],
)  # fmt: skip
def test_hostile_metadata_values_give_one_line(default_pack, tmp_path, field, value):
    good = default_pack

    def edit(meta, tensors):
        for e in meta["tensors"].values():
            if field in e or field in ("keep", "group", "dtype"):
                e[field] = value

    bad = _rewrite(good, tmp_path / "bad.skillpack", edit)
    line = _bad(run_cli("pack", "inspect", bad))
    assert "bad.skillpack" in line


def test_method_twin_recipe_runs_as_pack_twin(fam, tmp_path):
    """`method: twin` in a recipe (`merge-cli run`) writes what `pack twin` writes: the same shared model and
    the same exclusive packs, bit for bit; bad twin recipes are one line and exit 2."""
    recipe = write_recipe(tmp_path / "twin.yaml", {
        "method": "twin", "base_model": str(fam["base"]), "models": [str(fam["expert0"]), {"model": str(fam["expert1"])}],
        "parameters": {"shared_method": "task_arithmetic", "lambda": 0.4, "density": 0.5},
    })  # fmt: skip
    assert run_cli("validate", recipe).exit_code == 0
    r = run_cli("run", recipe, tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    r = run_cli("pack", "twin", fam["base"], fam["expert0"], fam["expert1"], tmp_path / "b",
                "--density", "0.5", "--param", "lambda=0.4")  # fmt: skip
    assert r.exit_code == 0, r.output
    a, b = load_output(tmp_path / "a" / "shared"), load_output(tmp_path / "b" / "shared")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("expert0", "expert1"):
        pa, pb = (load_file(str(tmp_path / d / f"{name}.skillpack")) for d in ("a", "b"))
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    for bad, needle in (
        ({"method": "twin", "models": [str(fam["expert0"])]}, "base_model"),
        ({"method": "twin", "base_model": str(fam["base"]), "models": [str(fam["expert0"])], "parameters": {"density": 2}}, "density"),
        ({"method": "twin", "base_model": str(fam["base"]), "models": [str(fam["expert0"])], "modles": []}, "did you mean 'models'"),
        ({"method": "twin", "base_model": str(fam["base"]), "models": [str(fam["expert0"])], "parameters": {"shared_method": "tie"}}, "unknown merge method"),
    ):  # fmt: skip
        r = run_cli("run", write_recipe(tmp_path / "bad.yaml", bad), tmp_path / "c", "-q")
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
