"""Issue 6.3-6.4: atomic, verifiable output; write errors and interrupts keep completed work for --resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import run_cli, write_recipe
from rel_helpers import FaultyFile, assert_same_output, interrupt_after, output_files, small_family
from safetensors.torch import save_file

import merge_cli.engine as engine
from merge_cli.io import writer as writer_mod
from merge_cli.io.writer import JOURNAL, temp_dir_for


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def reference(fam, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run_cli("run", fam["recipe"], out, "-q")
    assert res.exit_code == 0, res.stderr
    return out


def n_shards(out) -> int:
    return len(list(out.glob("*.safetensors")))


def journaled(tmp) -> list[str]:
    return [json.loads(x)["shard"] for x in (tmp / JOURNAL).read_text().splitlines()[1:]]


# -- write errors ------------------------------------------------------------------------------


def fill_disk_after(monkeypatch, nbytes: int) -> None:
    budget = [nbytes]
    real_init = writer_mod._HashingFile.__init__

    def init(self, path, *args):
        real_init(self, path, *args)
        self.f = FaultyFile(self.f, budget)

    monkeypatch.setattr(writer_mod._HashingFile, "__init__", init)


def test_disk_full_midway_keeps_completed_shards_then_resumes(fam, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tmp = temp_dir_for(out)
    fill_disk_after(monkeypatch, 9000)  # a few shards fit, then the disk is "full"
    res = run_cli("run", fam["recipe"], out, "-q")
    done = journaled(tmp)
    assert res.exit_code == 2 and 0 < len(done) < 25
    failing = f"model-{len(done) + 1:05d}-of-00025.safetensors"
    assert res.stderr.strip() == (
        f"error: cannot write {tmp}/{failing}: No space left on device (errno 28); free space or fix the disk; "
        f"completed shards are kept in {tmp}; {out} was not written; "
        f"resume with: merge-cli run {fam['recipe']} {out} --resume"
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp.iterdir()) == sorted([JOURNAL, *done])  # the unfinished shard is gone
    monkeypatch.undo()
    res = run_cli("run", fam["recipe"], out, "-q", "--resume")
    assert res.exit_code == 0, res.stderr
    assert f"resuming: {len(done)} of 25 shard(s) already complete and verified" in res.stderr
    assert not tmp.exists()
    assert_same_output(reference, out)
    assert json.loads((out / "merge_report.json").read_text())["engine"]["shards_reused"] == len(done)


def test_disk_full_before_any_shard_leaves_nothing(fam, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fill_disk_after(monkeypatch, 10)
    res = run_cli("run", fam["recipe"], out, "-q")
    tmp = temp_dir_for(out)
    assert res.stderr.strip() == (
        f"error: cannot write {tmp}/model-00001-of-00025.safetensors: No space left on device (errno 28); "
        f"free space or fix the disk; {out} was not written; resume with: merge-cli run {fam['recipe']} {out} --resume"
    )
    assert not out.exists() and not tmp.exists()


def test_write_error_in_side_files(fam, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tmp = temp_dir_for(out)

    def no_space(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp), "write_text", no_space)
    res = run_cli("run", fam["recipe"], out, "-q")
    assert res.exit_code == 2
    assert res.stderr.startswith(f"error: cannot write {tmp}/")
    assert not out.exists() and len(journaled(tmp)) == 25
    monkeypatch.undo()
    assert run_cli("run", fam["recipe"], out, "-q", "--resume").exit_code == 0
    assert_same_output(reference, out)


# -- interrupts and resume ---------------------------------------------------------------------


def test_ctrl_c_keeps_work_and_says_how_to_resume(fam, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tmp = temp_dir_for(out)
    interrupt_after(monkeypatch, 12)
    res = run_cli("run", fam["recipe"], out, "-q")
    assert res.exit_code == 130
    assert res.stderr.strip() == (
        f"interrupted: {out} was not written; completed shards are kept in {tmp}; "
        f"resume with: merge-cli run {fam['recipe']} {out} --resume"
    )
    assert not out.exists() and 0 < len(journaled(tmp)) <= 12
    monkeypatch.undo()
    assert run_cli("run", fam["recipe"], out, "-q", "--resume").exit_code == 0
    assert_same_output(reference, out)


def test_resume_recomputes_damaged_shards_and_ignores_a_torn_journal_line(
    fam, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    tmp = temp_dir_for(out)
    interrupt_after(monkeypatch, 15)
    run_cli("run", fam["recipe"], out, "-q")
    monkeypatch.undo()
    done = journaled(tmp)
    victim = tmp / done[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40
    victim.write_bytes(bytes(data))
    with open(tmp / JOURNAL, "a") as f:
        f.write('{"shard": "model-000')  # a kill in the middle of an append
    res = run_cli("run", fam["recipe"], out, "--resume")  # with the progress bar, which starts part-way
    assert res.exit_code == 0, res.stderr
    assert f"resuming: {len(done) - 1} of 25 shard(s) already complete and verified" in res.stderr
    assert_same_output(reference, out)


def test_resume_refuses_a_different_plan(fam, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 5)
    run_cli("run", fam["recipe"], out, "-q")
    monkeypatch.undo()
    res = run_cli("run", fam["recipe"], out, "-q", "--resume", "--seed", "9")
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"error: {temp_dir_for(out)} was left by a merge with a different recipe, inputs or merge-cli version; "
        "run without --resume to start over"
    )
    assert run_cli("run", fam["recipe"], out, "-q", "--seed", "9").exit_code == 0  # a fresh run starts over


def test_resume_with_nothing_to_resume_and_after_completion(fam, reference, tmp_path):
    out = tmp_path / "out"
    res = run_cli("run", fam["recipe"], out, "-q", "--resume")
    assert res.exit_code == 0
    assert f"nothing to resume ({temp_dir_for(out)} does not exist): merging from the start" in res.stderr
    assert_same_output(reference, out)
    res = run_cli("run", fam["recipe"], out, "-q", "--resume")
    assert (
        res.exit_code == 0
        and res.stdout.strip() == f"nothing to resume: {out} is complete and matches its manifest"
    )


def test_real_sigint_stops_a_subprocess_and_resume_finishes(fam, reference, tmp_path):
    """A real Ctrl-C (SIGINT) to `python -m merge_cli run`: exit 130, the resume hint, completed shards kept."""
    out = tmp_path / "out"
    tmp = temp_dir_for(out)
    env = {**__import__("os").environ, engine.TEST_DELAY_ENV: "0.2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "merge_cli", "run", str(fam["recipe"]), str(out), "-q"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((tmp / JOURNAL).exists() and journaled(tmp)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: {out} was not written; completed shards are kept in {tmp}; "
        f"resume with: merge-cli run {fam['recipe']} {out} --resume"
    )
    assert "Traceback" not in err
    assert run_cli("run", fam["recipe"], out, "-q", "--resume").exit_code == 0
    assert_same_output(reference, out)


def test_recipe_written_with_relative_models_resumes(fam, tmp_path, monkeypatch):
    """The fingerprint does not depend on the working directory."""
    recipe = write_recipe(tmp_path / "r.yaml", fam["recipe"].read_text())
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 8)
    run_cli("run", recipe, out, "-q")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    res = run_cli("run", "r.yaml", "out", "-q", "--resume")
    assert res.exit_code == 0 and "resuming: " in res.stderr


def test_resume_into_another_recipes_finished_output_is_refused(fam, reference, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", fam["recipe"], out, "-q").exit_code == 0
    res = run_cli("run", fam["recipe"], out, "-q", "--resume", "--seed", "4")
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: output {out} already exists; pass --overwrite to replace it"


def test_resume_with_row_chunked_tensors(fam, reference, tmp_path, monkeypatch):
    """Under a small memory budget the 32-row tensors merge in row chunks; an interrupt mid-way still resumes."""
    out = tmp_path / "out"
    real, calls = engine._Compute.chunked, [0]

    def chunked(*a, **k):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine._Compute, "chunked", chunked)
    assert run_cli("run", fam["recipe"], out, "-q", "--max-memory", "30KB").exit_code == 130
    monkeypatch.undo()
    done = journaled(temp_dir_for(out))
    res = run_cli("run", fam["recipe"], out, "-q", "--max-memory", "30KB", "--resume")
    assert res.exit_code == 0 and f"resuming: {len(done)} of 25 shard(s)" in res.stderr
    report = json.loads((out / "merge_report.json").read_text())
    assert sum(1 for t in report["tensors"] if t.get("chunked")) == 11
    a, b = output_files(reference), output_files(out)
    assert [k for k in a if k.endswith(("safetensors", "json")) and a[k] != b[k]] == []


def test_nonfinite_in_a_row_chunked_tensor(fam, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(fam["e1"] / "model.safetensors"))
    sd["model.embed_tokens.weight"][20, 3] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((fam["e1"] / "config.json").read_text())
    r = write_recipe(tmp_path / "r.yaml", fam["recipe"].read_text().replace(str(fam["e1"]), str(bad)))
    res = run_cli("run", r, tmp_path / "out", "-q", "--max-memory", "30KB")
    assert res.exit_code == 2
    rows = res.stderr.split("in rows ")[1].split(";")[0]
    r0, r1 = map(int, rows.split(".."))
    assert r0 <= 20 <= r1
    assert res.stderr.strip() == (
        "error: model 'bad': tensor 'model.embed_tokens.weight' holds 1 NaN value(s) out of "
        f"{(r1 - r0 + 1) * 16} in rows {r0}..{r1}; the file may be corrupt; pass --allow-nonfinite to merge anyway"
    )


def test_resume_ignores_garbled_journal_records(fam, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tmp = temp_dir_for(out)
    interrupt_after(monkeypatch, 6)
    run_cli("run", fam["recipe"], out, "-q")
    monkeypatch.undo()
    done = journaled(tmp)
    with open(tmp / JOURNAL, "a") as f:
        for rec in (
            {"shard": ["x"]},
            {"shard": 5, "tensors": []},
            {"shard": "model-00024-of-00025.safetensors", "tensors": [1, 2], "sha256": None},
            {"shard": "../../etc/passwd", "tensors": []},
            [1, 2],
        ):
            f.write(json.dumps(rec) + "\n")
    res = run_cli("run", fam["recipe"], out, "-q", "--resume")
    assert res.exit_code == 0, res.stderr
    assert f"resuming: {len(done)} of 25 shard(s) already complete and verified" in res.stderr
    assert_same_output(reference, out)
