"""Checks made before any weight is loaded: every model folder exists, has a config, a tokenizer and
safetensors headers, the tokenizers agree token for token, and the logit widths (vocabulary rows, from the
headers) cover the tokenizer. The rows every model has (the smallest) become the fused vocabulary width:
padded embedding tables (e.g. 151936 vs 152064 rows) are cropped to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import CheckpointError, MergeCliError

HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
EMBED_RE = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$")
TUNE_HINT = "pip install 'merge-cli[tune]'"


class VocabMismatch(MergeCliError):
    """Two models do not share one vocabulary: their logits cannot be added."""


def transformers_module():
    """transformers, imported lazily; a missing install is one clear line."""
    try:
        import transformers
    except ImportError:
        raise MergeCliError(
            f"merge-cli generate needs transformers to run the models: {TUNE_HINT} (or pip install transformers)"
        ) from None
    return transformers


SMALL_FILES = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]


def hub_folder(hub, weights: bool = False):
    """The hub model's snapshot folder in the local cache, downloaded if needed (HF_HUB_OFFLINE: the cache
    only): config and tokenizer files, and with weights=True its safetensors too. transformers then loads
    the folder as a local one and makes no hub call of its own."""
    from huggingface_hub import snapshot_download

    from merge_cli.io.hub import _hub_error, hub_cache_dir, hub_offline

    try:
        return Path(
            snapshot_download(
                hub.repo_id,
                revision=hub.revision,
                allow_patterns=SMALL_FILES + (WEIGHT_FILES if weights else []),
                cache_dir=str(hub_cache_dir()),
                local_files_only=hub_offline(),
            )
        )
    except Exception as e:  # noqa: BLE001 - huggingface_hub errors, worded by _hub_error
        raise _hub_error(hub, e, "its config/tokenizer files") from None


@dataclass
class ModelInfo:
    role: str  # "large", "small base", "expert 1", ...
    ref: str
    path: Path
    rows: int  # logit width: lm_head (or tied embedding) rows from the safetensors headers
    config_vocab: int | None
    hub: object | None = None  # a merge_cli.io.hub.HubRef when the model comes from the hub

    def load_args(self) -> tuple[str, dict]:
        """What from_pretrained takes for this model: always a local folder (a hub model's snapshot in the
        cache, its weights fetched first), so transformers makes no hub call of its own."""
        if self.hub is None:
            return str(self.path), {}
        return str(hub_folder(self.hub, weights=True)), {}

    @property
    def key(self) -> str:
        return str(self.hub) if self.hub is not None else str(self.path.resolve())


@dataclass
class Preflight:
    models: list[ModelInfo]
    vocab: int  # fused logit width: the rows every model has
    tokenizer_len: int

    def notes(self) -> list[str]:
        rows = {m.rows for m in self.models}
        if len(rows) > 1:
            return [
                f"vocabulary rows differ ({', '.join(f'{m.role} {m.rows}' for m in self.models)}); "
                f"logits cropped to the {self.vocab} rows all share (tokenizer: {self.tokenizer_len} tokens)"
            ]
        return []


def _rows(role: str, ref: str, path: Path, hub) -> tuple[int, int | None]:
    if hub is not None:  # headers from the hub's metadata (or the cache): no weight is downloaded
        from merge_cli.io.refs import open_checkpoint

        ck = open_checkpoint(ref)
    else:
        from merge_cli.io.checkpoint import Checkpoint

        ck = Checkpoint(path, ref)  # headers only
    try:
        cfg = ck.config or {}
        if not ck.config:
            raise CheckpointError(
                f"{role} '{ref}': {path} has no config.json; transformers needs the full HF model folder"
            )
        if cfg.get("is_encoder_decoder"):
            raise CheckpointError(f"{role} '{ref}': an encoder-decoder model; logit fusion needs causal LMs")
        name = next((n for n in HEAD_NAMES if n in ck.tensors), None)
        if name is None:
            name = next((n for n in sorted(ck.tensors) if EMBED_RE.search(n)), None)
        if name is None:
            raise CheckpointError(
                f"{role} '{ref}': no lm_head or embedding tensor in {path}; is it a causal language model?"
            )
        rows = int(ck.info(name).shape[0])
        vocab = cfg.get("vocab_size")
        if vocab is None and isinstance(cfg.get("text_config"), dict):
            vocab = cfg["text_config"].get("vocab_size")
        if isinstance(vocab, int) and vocab != rows:
            raise CheckpointError(
                f"{role} '{ref}': config.json says vocab_size {vocab} but {name} has {rows} rows; fix the config"
            )
        return rows, vocab if isinstance(vocab, int) else None
    finally:
        ck.close()


def load_tokenizer(role: str, ref: str, path: Path):
    tf = transformers_module()
    try:
        return tf.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{role} '{ref}': no usable tokenizer in {path} ({type(e).__name__}: {first}); "
            "copy the tokenizer files of its base model into the folder"
        ) from None


def _first_difference(va: dict, vb: dict) -> str:
    for tok, i in sorted(va.items(), key=lambda kv: kv[1]):
        if vb.get(tok) != i:
            other = vb.get(tok)
            return f"token {tok!r} is id {i} in one and {'absent' if other is None else f'id {other}'} in the other"
    for tok, i in sorted(vb.items(), key=lambda kv: kv[1]):
        if tok not in va:
            return f"token {tok!r} (id {i}) is only in the second"
    return "special tokens differ"


def _specials(tok) -> tuple:
    return (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id)


def check_models(models: list[tuple]):
    """models: (role, ref, folder[, HubRef]) with the large model first; for a hub model the folder holds its
    config and tokenizer files. Returns (Preflight, tokenizer of the first)."""
    models = [tuple(m) + (None,) * (4 - len(m)) for m in models]
    infos = []
    for role, ref, path, hub in models:
        rows, cfg_vocab = _rows(role, ref, path, hub)
        infos.append(ModelInfo(role, ref, path, rows, cfg_vocab, hub))
    first_role, first_ref, first_path, _ = models[0]
    tok0 = load_tokenizer(first_role, first_ref, first_path)
    v0 = tok0.get_vocab()
    seen = {infos[0].key}
    for info, (role, ref, path, _) in zip(infos[1:], models[1:]):
        if info.key in seen:
            continue
        seen.add(info.key)
        tok = load_tokenizer(role, ref, path)
        v = tok.get_vocab()
        if v != v0 or _specials(tok) != _specials(tok0):
            raise VocabMismatch(
                f"vocabularies differ: {first_role} '{first_ref}' ({len(v0)} tokens) and {role} '{ref}' "
                f"({len(v)} tokens): {_first_difference(v0, v)}; logit fusion needs models sharing one tokenizer"
            )
    need = len(v0)
    width = min(m.rows for m in infos)
    if width < need:
        short = min(infos, key=lambda m: m.rows)
        raise VocabMismatch(
            f"{short.role} '{short.ref}' has {short.rows} vocabulary rows but the tokenizer has {need} tokens; "
            "its logits cannot cover the shared vocabulary"
        )
    return Preflight(infos, width, need), tok0
