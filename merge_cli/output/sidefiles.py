"""Side files from the donor model (config is written by the plan): generation config, tokenizer files,
special tokens, chat template, processor files; and the recipe's `chat_template:`.

`chat_template:` may be a literal jinja template (it contains `{{` or `{%`), a built-in name
(see BUILTIN_TEMPLATES), `auto` (the template most models share), or the label / reference of a listed
model whose template is taken. The chosen
template is written to chat_template.jinja and into tokenizer_config.json's `chat_template`.
Hub donors have their side files fetched (small files only) just before they are copied.
"""

from __future__ import annotations

import json
from pathlib import Path

from merge_cli.errors import CheckpointError, RecipeError, did_you_mean
from merge_cli.io.checkpoint import Checkpoint

EXTRA_SIDE_FILES = (
    "video_preprocessor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)

# Written for merge-cli from the public descriptions of each chat format.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}


# The files a merge copies from its donor beside the weights (one list: runs, EMR tasks and packs use it)
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def _side_file(ck: Checkpoint, name: str) -> Path | None:
    """A donor's file by name: from its folder, or fetched from the hub (through views and adapters)."""
    from merge_cli.io.lora import LoraCheckpoint
    from merge_cli.io.vocab import VocabView

    while isinstance(ck, (VocabView, LoraCheckpoint)):
        ck = ck.inner if isinstance(ck, VocabView) else ck.base
    fetch = getattr(ck, "side_file", None)
    if fetch is not None:
        return fetch(name)
    if ck.folder is not None and (Path(ck.folder) / name).is_file():
        return Path(ck.folder) / name
    return None


def side_file_names() -> tuple[str, ...]:

    return tuple(dict.fromkeys((*SIDE_FILES, *EXTRA_SIDE_FILES)))


def donor_side_files(plan) -> dict[str, Path]:
    ck = plan.models[plan.donor].checkpoint
    out = {}
    for name in side_file_names():
        p = _side_file(ck, name)
        if p is not None:
            out[name] = p
    return out


def _template_of(ck: Checkpoint) -> str | None:
    p = _side_file(ck, "chat_template.jinja")
    if p is not None:
        return p.read_text()
    p = _side_file(ck, "tokenizer_config.json")
    if p is not None:
        t = _json_object(p).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def _json_object(path: Path) -> dict:
    """A side file from a stranger's model folder: malformed JSON is one CheckpointError line (issue 6)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: unreadable {path.name} ({e.__class__.__name__}); fix or remove it"
        ) from None
    return data if isinstance(data, dict) else {}


def resolve_chat_template(plan) -> tuple[str, str] | None:
    """(template text, where it came from) for the recipe's chat_template, or None when unset."""
    spec = plan.recipe.chat_template
    if spec is None:
        return None
    where = plan.recipe.where(("chat_template",))
    if "{{" in spec or "{%" in spec:
        return spec, "the recipe"
    if spec == "auto":  # the template most sources share (ties: the donor's, then the earlier model's)
        found = [(m.label, _template_of(m.checkpoint)) for m in plan.models]
        texts = [t for _, t in found if t]
        if not texts:
            raise RecipeError(f"{where}: chat_template 'auto': no model has a chat template")
        donor_text = found[plan.donor][1]
        best = max(dict.fromkeys(texts), key=lambda t: (texts.count(t), t == donor_text))
        label = next(lbl for lbl, t in found if t == best)
        return best, f"'auto' ({texts.count(best)} of {len(found)} models, first '{label}')"
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"built-in '{spec}'"
    for m in plan.models:
        if spec in (m.label, m.ref):
            text = _template_of(m.checkpoint)
            if text is None:
                raise RecipeError(f"{where}: model '{spec}' has no chat template to take")
            return text, f"model '{m.label}'"
    choices = [*BUILTIN_TEMPLATES, *(m.label for m in plan.models)]
    raise RecipeError(
        f"{where}: chat_template '{spec}' is not jinja, a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
        f"or a listed model{did_you_mean(spec, choices)}"
    )


def tokenizer_size(path: Path) -> int | None:
    """Token count of a tokenizer.json (model vocabulary plus added tokens), or None if unreadable."""
    try:
        tok = json.loads(path.read_text())
        vocab = tok["model"].get("vocab")
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or [])))
        ids |= {t["id"] for t in tok.get("added_tokens", [])}
        return max(ids) + 1 if ids else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def write_side_files(plan, writer, files: dict[str, Path], template: tuple[str, str] | None) -> list[str]:
    """Copy the donor's side files into the output, applying the chat template; returns notes."""
    notes = []
    for name, path in files.items():
        if template is not None and name in (
            "chat_template.jinja",
            "tokenizer_config.json",
            "chat_template.json",
        ):
            continue
        writer.copy_file(path, name)
    if template is not None:
        text, origin = template
        writer.write_text("chat_template.jinja", text)
        tc = {}
        if "tokenizer_config.json" in files:
            tc = _json_object(files["tokenizer_config.json"])
        tc["chat_template"] = text
        writer.write_json("tokenizer_config.json", tc)
        notes.append(f"chat template from {origin}")
    size = tokenizer_size(files["tokenizer.json"]) if "tokenizer.json" in files else None
    rows = (plan.config or {}).get("vocab_size")
    if size and isinstance(rows, int) and size > rows:
        notes.append(
            f"vocab: the tokenizer has {size} tokens but the output has {rows} embedding rows; ids >= {rows} are out of range"
        )
    return notes
