"""The README.md model card: hub metadata front matter, method and paper, models with their pinned
commits, headline figures, notes (vocabulary, templates, licenses), how to rebuild, and the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.lock import summary_lines


def _layers(ck: Checkpoint) -> list[Checkpoint]:
    """The checkpoints a source is made of: a plain/hub model, or base and adapter."""
    from merge_cli.io.lora import LoraCheckpoint
    from merge_cli.io.vocab import VocabView

    while isinstance(ck, VocabView):
        ck = ck.inner
    if isinstance(ck, LoraCheckpoint):
        return [*_layers(ck.base), ck.adapter]
    return [ck]


def _front_matter(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def source_metadata(ck: Checkpoint) -> dict[str, Any]:
    """Hub id (if any) and card metadata (license) of one checkpoint, from hub card data or README.md."""
    from merge_cli.io.hub import HubCheckpoint

    if isinstance(ck, HubCheckpoint):
        card = ck.repo.card or _front_matter(ck.side_file("README.md"))
        return {"hub_id": ck.hub.repo_id, "license": card.get("license")}
    folder = ck.folder if ck.folder is not None else Path(ck.path).parent
    return {"hub_id": None, "license": _front_matter(Path(folder) / "README.md").get("license")}


def card_metadata(plan) -> tuple[dict[str, Any], list[str]]:
    """Front matter for the card, plus warnings (licenses that are unknown or disagree)."""
    parts = [(m.label, c) for m in plan.models for c in _layers(m.checkpoint)]
    metas = [(label, source_metadata(c)) for label, c in parts]
    hub_ids = list(dict.fromkeys(md["hub_id"] for _, md in metas if md["hub_id"]))
    licenses = {label: md["license"] for label, md in metas}
    warnings = []
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = hub_ids
        if len(plan.models) > 1:
            front["base_model_relation"] = "merge"
    found = set(licenses.values())
    if len(found) == 1 and None not in found:
        front["license"] = found.pop()
    else:
        listing = ", ".join(f"{k}: {v or 'unknown'}" for k, v in licenses.items())
        warnings.append(
            f"license: the sources do not agree or are unknown ({listing}); none is declared, check before publishing"
        )
    front["library_name"] = "transformers"
    methods = sorted({j.method for j in plan.jobs})
    tags = ["merge", "merge-cli", *(f"{m}-merge" for m in methods)]
    if any(len(_layers(m.checkpoint)) > 1 for m in plan.models):
        tags.append("lora")
    front["tags"] = tags
    return front, warnings


def model_card(
    plan, recipe_text: str, report: dict[str, Any], lock: dict[str, Any] | None, front: dict
) -> str:
    name = plan.recipe.name or "Merged model"
    methods = "\n".join(f"- `{m}`: {v['title']}. {v['paper']}" for m, v in report["methods_used"].items())
    base = plan.recipe.base_model
    models = "\n".join(f"- `{m.ref}`" + (" (base)" if base and m.ref == base else "") for m in plan.models)
    summary = "\n".join(
        f"- `{m}`: {row['tensors']} tensors"
        + (f", mean kept fraction {row['mean_kept_fraction']:.3f}" if "mean_kept_fraction" in row else "")
        + (
            f", sign conflicts {row['mean_sign_conflict_rate']:.3f}"
            if "mean_sign_conflict_rate" in row
            else ""
        )
        for m, row in report["summary"].items()
    )
    eng = report.get("engine", {})
    summary += (
        f"\n- output {report['out_dtype']} in {len(report['shards'])} shard(s); compute {report['compute_dtype']}; "
        f"{eng.get('bytes_read', 0) / 1e6:.1f} MB read, {eng.get('bytes_written', 0) / 1e6:.1f} MB written"
    )
    notes = "".join(f"\n> {n}\n" for n in report.get("notes", []))
    rebuild = ""
    if lock is not None:
        pins = "\n".join(f"- {line}" for line in summary_lines(lock))
        rebuild = (
            "## Reproduce\n\nEvery input is pinned in `recipe.lock.yaml` (hub commits, sha256 of every file read):\n\n"
            f"{pins}\n\n```sh\nmerge-cli run recipe.yaml OUT_DIR --locked recipe.lock.yaml\n```\n\n"
        )
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + f"# {name}\n\n"
        + "This model was made by merging pretrained language models with "
        + "[merge-cli](https://pypi.org/project/merge-cli/).\n\n"
        + f"## Method\n\n{methods}\n\n## Models merged\n\n{models}\n\n"
        + f"## Merge summary\n\n{summary}\n{notes}\nSee `merge_report.json` for per-tensor figures.\n\n"
        + rebuild
        + f"## Recipe\n\n```yaml\n{recipe_text.rstrip()}\n```\n"
    )
