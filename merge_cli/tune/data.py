"""Tuning data: JSONL rows -> token sequences, with one clear line (file, line number, what) per bad row.

objective entropy: {"text": "..."} or {"input_ids": [...]}, optional "task" (a label; tasks are balanced)
objective nll:     {"prompt": "...", "completion": "..."} or {"prompt_ids": [...], "completion_ids": [...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_cli.errors import MergeCliError

FIELDS = {
    "entropy": (("text",), ("input_ids",)),
    "nll": (("prompt", "completion"), ("prompt_ids", "completion_ids")),
}


@dataclass
class Example:
    ids: list[int]
    prompt_len: int  # nll: tokens before the completion (the loss is on ids[prompt_len:]); entropy: 0
    task: str


class Tokenizer:
    """The base model's tokenizer.json (the `tokenizers` library), loaded on first use."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._tok = None

    @property
    def path(self) -> Path | None:
        if self.folder is None:
            return None
        p = Path(self.folder) / "tokenizer.json"
        return p if p.is_file() else None

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            from tokenizers import Tokenizer as _T

            self._tok = _T.from_file(str(self.path))
        return list(self._tok.encode(text, add_special_tokens=False).ids)


def _ids(value, where: str, key: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise MergeCliError(f"{where}: '{key}' must be a list of integer token ids")
    bad = next((x for x in value if not 0 <= x < vocab), None)
    if bad is not None:
        raise MergeCliError(
            f"{where}: token id {bad} in '{key}' is outside the base model's vocabulary (0..{vocab - 1})"
        )
    return value


def _text(row: dict, key: str, where: str, tok: Tokenizer, vocab: int, base_name: str) -> list[int]:
    value = row[key]
    if not isinstance(value, str):
        raise MergeCliError(f"{where}: '{key}' must be a string")
    if tok.path is None:
        ids_key = "input_ids" if key == "text" else f"{key}_ids"
        raise MergeCliError(
            f"{where}: '{key}' needs a tokenizer, but the base model {base_name} has no tokenizer.json; "
            f"give token ids in '{ids_key}' instead"
        )
    return _ids(tok.encode(value), where, f"{key} (tokenized)", vocab)


def load_data(
    path: Path, objective: str, vocab: int, tokenizer: Tokenizer, base_name: str, max_length: int = 512
) -> list[Example]:
    """Every row of a JSONL file as an Example; the first bad row stops with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise MergeCliError(f"{path}: no such data file (give a JSONL file, one JSON object per line)")
    text_keys, id_keys = FIELDS[objective]
    out: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MergeCliError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise MergeCliError(f"{where}: each line must be a JSON object")
            if all(k in row for k in id_keys):
                parts = [_ids(row[k], where, k, vocab) for k in id_keys]
            elif all(k in row for k in text_keys):
                parts = [_text(row, k, where, tokenizer, vocab, base_name) for k in text_keys]
            else:
                need = " and ".join(f"'{k}'" for k in text_keys)
                alt = " and ".join(f"'{k}'" for k in id_keys)
                missing = next(k for k in text_keys if k not in row)
                raise MergeCliError(
                    f"{where}: missing field '{missing}' (objective {objective} needs {need}, or {alt})"
                )
            task = row.get("task", "")
            if not isinstance(task, (str, int)):
                raise MergeCliError(f"{where}: 'task' must be a string label")
            if objective == "entropy":
                ids, prompt_len = parts[0][:max_length], 0
                if not ids:
                    raise MergeCliError(f"{where}: the text has no tokens")
            else:
                ids = (parts[0] + parts[1])[:max_length]
                prompt_len = len(parts[0])
                if not parts[1] or prompt_len == 0:
                    raise MergeCliError(f"{where}: prompt and completion must both have tokens")
                if prompt_len >= len(ids):
                    raise MergeCliError(
                        f"{where}: the prompt fills --max-length {max_length}; no completion left"
                    )
            out.append(Example(ids, prompt_len, str(task)))
    if not out:
        raise MergeCliError(f"{path}: the data file is empty; give one JSON object per line")
    return out


def by_task(examples: list[Example]) -> dict[str, list[Example]]:
    tasks: dict[str, list[Example]] = {}
    for e in examples:
        tasks.setdefault(e.task, []).append(e)
    return dict(sorted(tasks.items()))


def collate(examples: list[Example], device: torch.device, pad: int = 0):
    """Right-padded input_ids, attention_mask and prompt lengths for a batch."""
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    plen = torch.tensor([e.prompt_len for e in examples])
    return ids.to(device), mask.to(device), plen.to(device)
