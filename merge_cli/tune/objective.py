"""The model (transformers' AutoModelForCausalLM, an optional extra) and the two objectives.

entropy: mean Shannon entropy of the next-token distribution over the scored positions (all tokens of
         the text, or only the last one), AdaMerging's unsupervised loss at token level.
nll:     mean cross-entropy of the completion tokens given the prompt (supervised; Self Positioning, aTLAS).
Each task's batch gives one loss; the step's loss is their mean (tasks are balanced).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from merge_cli.errors import MergeCliError

OBJECTIVES = ("entropy", "nll")
INSTALL_HINT = (
    "merge-cli tune needs transformers: pip install 'merge-cli[tune]' (or pip install transformers)"
)


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise MergeCliError(INSTALL_HINT) from None
    return transformers


def build_model(folder: Path, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """An AutoModelForCausalLM from `folder`'s config.json holding `state` (no copy, no weights re-read)."""
    transformers = require_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MergeCliError(
            f"{folder}: tune needs the base model's config.json to build the model (an HF folder)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, OSError) as e:
        raise MergeCliError(
            f"{folder}: transformers cannot build this model ({str(e).splitlines()[0]})"
        ) from None
    own = model.state_dict()
    extra = sorted(set(state) - set(own))
    if extra:
        raise MergeCliError(
            f"{folder}: tensor '{extra[0]}' has no place in {type(model).__name__} built from config.json"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def logits_of(model, params: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A functional forward: the model with `params` in place of its own tensors."""
    out = torch.func.functional_call(
        model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False}
    )
    return out.logits


def entropy_loss(logits: torch.Tensor, mask: torch.Tensor, last_only: bool) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)  # [B, T]
    if last_only:
        last = mask.sum(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last].mean()
    m = mask.to(h.dtype)
    return (h * m).sum() / m.sum()


def nll_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, plen: torch.Tensor) -> torch.Tensor:
    pred, target = logits[:, :-1].float(), ids[:, 1:]
    pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    valid = (pos >= plen[:, None]) & mask[:, 1:].bool()
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    v = valid.reshape(-1).to(ce.dtype)
    return (ce * v).sum() / v.sum()


def loss_of(objective: str, logits, ids, mask, plen, last_only: bool = False) -> torch.Tensor:
    if objective == "entropy":
        return entropy_loss(logits, mask, last_only)
    return nll_loss(logits, ids, mask, plen)
