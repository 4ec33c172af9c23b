"""Side files and chat templates, the model card's hub metadata, and `merge-cli push`."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import jinja2
import pytest
import yaml
from helpers import run_cli, write_recipe

from merge_cli.output.sidefiles import BUILTIN_TEMPLATES


@pytest.fixture
def models(family, tmp_path):
    for n in ("base", "expert0", "expert1"):
        shutil.copytree(family[n], tmp_path / n)
    return tmp_path


def _recipe(root, **extra):
    return write_recipe(
        root / "r.yaml",
        {"method": "linear", "models": ["./base", "./expert0", "./expert1"], **extra},
    )


def _card_front(out):
    return yaml.safe_load((out / "README.md").read_text().split("---")[1])


def test_builtin_chat_template_and_donor_side_files(models):
    (models / "expert0" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 2, "temperature": 0.3})
    )
    r = run_cli("run", _recipe(models, chat_template="chatml", donor="expert0"), models / "out", "-q")
    assert r.exit_code == 0, r.stderr
    out = models / "out"
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.3
    assert (out / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["chatml"]
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (
        tc["chat_template"] == BUILTIN_TEMPLATES["chatml"]
        and tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    text = jinja2.Template(tc["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (models / "expert0" / name).read_bytes()
    assert "chat template from built-in 'chatml'" in (out / "README.md").read_text()


def test_chat_template_from_a_model_or_literal(models):
    (models / "expert1" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert run_cli("run", _recipe(models, chat_template="expert1"), models / "o1", "-q").exit_code == 0
    assert (models / "o1" / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}!"
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert run_cli("run", _recipe(models, chat_template=literal), models / "o2", "-q").exit_code == 0
    assert json.loads((models / "o2" / "tokenizer_config.json").read_text())["chat_template"] == literal


def test_auto_chat_template_takes_the_most_common(models):
    for n, t in (("base", "A{{ x }}"), ("expert0", "B{{ x }}"), ("expert1", "B{{ x }}")):
        (models / n / "chat_template.jinja").write_text(t)
    assert run_cli("run", _recipe(models, chat_template="auto"), models / "out", "-q").exit_code == 0
    assert (models / "out" / "chat_template.jinja").read_text() == "B{{ x }}"


def test_unknown_chat_template_fails_before_merging(models):
    r = run_cli("run", _recipe(models, chat_template="chatm"), models / "out", "-q")
    assert r.exit_code == 2 and "did you mean 'chatml'" in r.stderr
    assert not (models / "out").exists()


def _license(folder, lic):
    (folder / "README.md").write_text(f"---\nlicense: {lic}\ntags: [x]\n---\n# model\n")


def test_card_license_only_when_sources_agree(models):
    for n in ("base", "expert0", "expert1"):
        _license(models / n, "mit")
    assert run_cli("run", _recipe(models, name="my-merge"), models / "o1", "-q").exit_code == 0
    front = _card_front(models / "o1")
    assert front["license"] == "mit" and front["library_name"] == "transformers"
    assert front["tags"][:3] == ["merge", "merge-cli", "linear-merge"]
    card = (models / "o1" / "README.md").read_text()
    assert "# my-merge" in card and "## Reproduce" in card and "recipe.lock.yaml" in card
    assert "Linear average (model soups)" in card and "arXiv:2203.05482" in card  # method and paper
    assert "method: linear" in card  # the recipe itself
    _license(models / "expert1", "llama3")
    assert run_cli("run", _recipe(models), models / "o2", "-q").exit_code == 0
    assert "license" not in _card_front(models / "o2")
    assert "expert1: llama3" in (models / "o2" / "README.md").read_text()


@pytest.fixture
def merged(models):
    assert run_cli("run", _recipe(models), models / "out", "-q").exit_code == 0
    return models / "out"


def test_push_dry_run_lists_files_and_calls_nothing(merged, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no hub call in a dry run")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", boom)
    r = run_cli("push", merged, "me/my-merge", "--dry-run")
    assert r.exit_code == 0, r.stderr
    for name in ("model.safetensors", "README.md", "recipe.lock.yaml", "manifest.json", "config.json"):
        assert name in r.stdout
    assert "would upload" in r.stdout and "me/my-merge" in r.stdout


def test_push_calls_the_upload_api(merged, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_branch", lambda self, *a, **k: calls.append(("create_branch", a, k))
    )

    def upload(self, **k):
        calls.append(("upload_folder", (), k))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/m/commit/abc"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    r = run_cli("push", merged, "me/m", "--private", "--revision", "v1")
    assert r.exit_code == 0, r.stderr
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == ("me/m",) and calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["branch"] == "v1"
    up = calls[2][2]
    assert up["repo_id"] == "me/m" and up["revision"] == "v1" and up["folder_path"] == str(merged)
    assert "commit/abc" in r.stdout


def test_push_refuses_unfinished_or_bad_targets(merged, monkeypatch, tmp_path):
    assert (
        run_cli("push", tmp_path / "base", "me/m", "--dry-run").exit_code == 2
    )  # no manifest: not a merge output
    r = run_cli("push", merged, "not a repo", "--dry-run")
    assert r.exit_code == 2 and "user/name" in r.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_cli("push", merged, "me/m")
    assert r.exit_code == 2 and "HF_HUB_OFFLINE" in r.stderr
    (merged / "model.safetensors").write_bytes(b"truncated")
    assert "damaged" in run_cli("push", merged, "me/m", "--dry-run").stderr
