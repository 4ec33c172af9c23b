"""Vocabulary alignment and tied embeddings, decided at plan time from headers alone.

When the models' embedding / lm_head row counts differ (padded embeddings, added tokens), the recipe's
`vocab:` key decides:
  error          (default) stop with a message naming the sizes and the options
  crop           keep the rows every model has: output vocabulary = the smallest size
  pad_from_base  output vocabulary = the base's (the first model's without a base); a model with fewer
                 rows borrows the base's rows for the ids it lacks, a model with more rows is cropped
Tied embeddings: a model is tied when its config says tie_word_embeddings or it has an embedding but no
lm_head tensor. A tied reference (base, or first model) keeps the output tied: no lm_head is written even
when some source stores one. An untied reference reads a tied source's embedding as that source's head.

Both are done by wrapping checkpoints in a VocabView (renamed / cropped / padded rows on read), so the
plan and engine see ordinary, equally shaped tensors. What was done goes into the plan's notes (and so
into merge_report.json/.md and the model card); the output config's vocab_size follows.
"""

from __future__ import annotations

import re

import torch

from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.safetensors_file import TensorInfo
from merge_cli.modules import classify

_EMBED_RE = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$")
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_NOT_VOCAB = re.compile(r"(wpe|position_embeddings|token_type_embeddings|embed_positions)")


class VocabView(Checkpoint):
    """A checkpoint seen through renames (tied heads) and a row count per vocabulary tensor."""

    def __init__(self, inner: Checkpoint):
        self.inner = inner
        self.ref, self.path, self.folder, self.config, self.files = (
            inner.ref,
            inner.path,
            inner.folder,
            inner.config,
            inner.files,
        )
        self.tensors: dict[str, TensorInfo] = dict(inner.tensors)
        self.alias: dict[str, str] = {}
        self.pad: Checkpoint | None = None

    def __getattr__(self, attr):  # hub commit, side_file, adapter fields... of the wrapped checkpoint
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def add_alias(self, name: str, source: str) -> None:
        self.alias[name] = source
        i = self.inner.info(source)
        self.tensors[name] = TensorInfo(name, i.dtype, i.shape, i.file, i.start, i.nbytes)

    def hide(self, name: str) -> None:
        self.tensors.pop(name, None)

    def set_rows(self, name: str, rows: int) -> None:
        i = self.tensors[name]
        row_bytes = i.nbytes // i.shape[0] if i.shape and i.shape[0] else 0
        self.tensors[name] = TensorInfo(
            name, i.dtype, (rows, *i.shape[1:]), i.file, i.start, rows * row_bytes
        )

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        src = self.alias.get(name, name)
        own = self.inner.info(src).shape[0]
        parts = []
        if start < own:
            parts.append(self.inner.read_rows(src, start, min(stop, own)))
        if stop > own:
            if self.pad is None:
                raise RuntimeError(f"{name}: rows {own}..{stop} have no source")
            extra = self.pad.read_rows(name, max(start, own), stop)
            parts.append(extra.to(parts[0].dtype if parts else self.inner.read_rows(src, 0, 1).dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if not info.shape:
            return self.inner.read(self.alias.get(name, name))
        return self.read_rows(name, 0, info.shape[0]).reshape(info.shape)

    def fetch(self, names=None):
        fetch = getattr(self.inner, "fetch", None)
        if fetch is None:
            return []
        names = (
            None
            if names is None
            else [self.alias.get(n, n) for n in names if self.alias.get(n, n) in self.inner.tensors]
        )
        return fetch(names)

    def num_layers(self) -> int | None:
        return self.inner.num_layers()

    def close(self) -> None:
        self.inner.close()


def embed_name(ck: Checkpoint) -> str | None:
    return next((n for n in ck.tensors if _EMBED_RE.search(n)), None)


def head_name(ck: Checkpoint) -> str | None:
    return next((n for n in _HEAD_NAMES if n in ck.tensors), None)


def is_tied(ck: Checkpoint) -> bool:
    cfg = ck.config or {}
    flag = cfg.get("tie_word_embeddings")
    if flag is None and isinstance(cfg.get("text_config"), dict):
        flag = cfg["text_config"].get("tie_word_embeddings")
    if flag is not None:
        return bool(flag)
    return embed_name(ck) is not None and head_name(ck) is None


def vocab_tensors(ck: Checkpoint) -> list[str]:
    return [
        n
        for n, i in ck.tensors.items()
        if i.shape
        and classify(n).group in ("embed", "lm_head")
        and not _NOT_VOCAB.search(n)
        and classify(n).layer is None
    ]


def harmonize(models: list, ref: int, mode: str, notes: list[str]) -> int | None:
    """Wrap `models[i].checkpoint` (plan ModelSlots) so vocabulary tensors line up; returns the output
    vocabulary size when it was changed from the reference's, else None."""
    ref_ck = models[ref].checkpoint
    emb = embed_name(ref_ck)
    if emb is None:
        return None
    views = {i: VocabView(m.checkpoint) for i, m in enumerate(models)}
    changed = False
    ref_tied = is_tied(ref_ck)
    ref_head = head_name(ref_ck)
    for i, v in views.items():
        label, head = models[i].label, head_name(v.inner)
        if ref_tied and head is not None and head not in ref_ck.tensors and i != ref:
            notes.append(
                f"vocab: '{label}' stores its own {head}; the output keeps tied embeddings, so it is not merged"
            )
        if ref_tied and head is not None and i == ref:
            v.hide(head)
            notes.append(
                f"vocab: '{label}' is tied (tie_word_embeddings) but also stores {head}; the output stays tied"
            )
            changed = True
        if not ref_tied and ref_head and head is None and embed_name(v.inner):
            v.add_alias(ref_head, embed_name(v.inner))
            notes.append(
                f"vocab: '{label}' has tied embeddings; its embedding matrix serves as its {ref_head}"
            )
            changed = True
    names = [n for n in vocab_tensors(views[ref]) if n in views[ref].tensors]
    rows = {i: views[i].tensors[emb].shape[0] for i in views if emb in views[i].tensors}
    sizes = sorted(set(rows.values()))
    new_size = None
    if len(sizes) > 1:
        listing = ", ".join(f"'{models[i].label}' {n}" for i, n in rows.items())
        if mode == "error":
            raise PlanError(
                f"tensor '{emb}': vocabulary sizes differ ({listing}); add `vocab: crop` (keep the {sizes[0]} rows "
                f"all models have) or `vocab: pad_from_base` (the base's {rows[ref]} rows, missing ones taken from the "
                "base) to the recipe, or merge models that share one tokenizer vocabulary"
            )
        target = sizes[0] if mode == "crop" else rows[ref]
        for i, v in views.items():
            have = rows.get(i)
            if have is None or have == target:
                continue
            for n in names:
                if n in v.tensors and v.tensors[n].shape[0] == have:
                    v.set_rows(n, target)
            if have > target:
                notes.append(f"vocab ({mode}): '{models[i].label}' cropped from {have} to {target} rows")
            else:
                v.pad = views[ref]
                notes.append(
                    f"vocab ({mode}): '{models[i].label}' padded from {have} to {target} rows with the base's rows"
                )
        changed = True
        new_size = target if target != rows[ref] else None
    if changed:
        for i, v in views.items():
            models[i].checkpoint = v
    return new_size


def patch_config(cfg: dict | None, vocab_size: int | None) -> dict | None:
    """The output config with vocab_size set to the merged vocabulary (top level and text_config)."""
    if cfg is None or vocab_size is None:
        return cfg
    cfg = dict(cfg)
    if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        cfg["text_config"] = {**cfg["text_config"], "vocab_size": vocab_size}
    if "vocab_size" in cfg or "text_config" not in cfg:
        cfg["vocab_size"] = vocab_size
    return cfg
