"""`merge-cli push OUT_DIR REPO_ID`: publish a finished merge with huggingface_hub's upload API.

Only a complete output folder is pushed (it has the manifest.json the writer adds last, and every file
it lists is present with its size). --dry-run lists what would be uploaded and calls nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import MergeCliError

MANIFEST = "manifest.json"


class PushError(MergeCliError):
    """The folder cannot be pushed as asked."""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)


def plan_push(folder: Path, repo_id: str, revision: str | None = None, private: bool = False) -> PushPlan:
    from merge_cli.io.hub import parse_hub_ref

    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such output folder")
    ref = parse_hub_ref(repo_id)
    if ref is None or "@" in repo_id:
        raise PushError(
            f"'{repo_id}' is not a hub repo id; write it as user/name (use --revision for a branch)"
        )
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise PushError(
            f"{folder} has no {MANIFEST}: it is not a finished merge-cli output; run the merge again"
        )
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise PushError(f"{manifest}: unreadable manifest ({e})") from None
    for name, meta in listed.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != meta.get("size"):
            raise PushError(
                f"{folder}: {name} is missing or its size differs from {MANIFEST}; the output is damaged"
            )
    files = sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return PushPlan(folder, ref.repo_id, revision, private, files)


def push(plan: PushPlan, commit_message: str | None = None) -> str:
    """Create the repo (and branch) if needed and upload the folder in one commit; returns the commit URL."""
    from merge_cli.io.hub import hub_offline

    if hub_offline():
        raise PushError("HF_HUB_OFFLINE is set: cannot push; unset it (and set HF_TOKEN) to publish")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=plan.repo_id,
            folder_path=str(plan.folder),
            repo_type="model",
            revision=plan.revision,
            commit_message=commit_message or "Upload merged model (merge-cli)",
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise PushError(
            f"push to '{plan.repo_id}' failed ({type(e).__name__}: {first}); check HF_TOKEN and the repo id"
        ) from None
    return str(getattr(info, "commit_url", info))
