"""Calibration Hessians for GPTQ-style compensation: H = sum over calibration tokens of x x^T, for the
input x of every linear layer of a model, collected with forward hooks (transformers, the `check` extra).

The model runs whole in float32 on the CPU (or `device`), so calibration needs the model's memory plus one
n_in x n_in float32 matrix per linear layer: fine for small and mid-size models, not bounded like the rest
of extraction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.errors import MergeCliError


class CalibrationError(MergeCliError):
    """Calibration text or model cannot be used."""


def collect_hessians(model_dir: Path, text_path: Path, *, max_tokens: int = 4096, seqlen: int = 512,
                     device: str = "cpu") -> dict[str, torch.Tensor]:  # fmt: skip
    """{'<module>.weight': H [n_in, n_in] float32} for the model's nn.Linear layers, over the text's tokens."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CalibrationError("--calibration needs transformers: pip install 'merge-cli[check]'") from None
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"--calibration {text_path}: unreadable ({e})") from None
    if model_dir is None or not Path(model_dir).is_dir():
        raise CalibrationError("--calibration needs the fine-tune as a local HF folder (config + tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's folder
        raise CalibrationError(
            f"--calibration: cannot load {model_dir} with transformers ({str(e)[:120]})"
        ) from None
    seqlen = min(seqlen, getattr(model.config, "max_position_embeddings", None) or seqlen)
    tok.model_max_length = 1 << 30  # the text is split into model-sized windows below
    ids = tok(text, return_tensors="pt")["input_ids"][0][:max_tokens]
    if ids.numel() < 2:
        raise CalibrationError(f"--calibration {text_path}: fewer than 2 tokens of text")
    hs: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            h = x.T @ x
            hs[name] = hs[name] + h.cpu() if name in hs else h.cpu()

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(hook(f"{name}.weight")))
    try:
        with torch.no_grad():
            for s in range(0, ids.numel(), seqlen):
                model(ids[s : s + seqlen][None].to(device))
    finally:
        for h in hooks:
            h.remove()
    return hs


def calib_rel_error(err: torch.Tensor, delta: torch.Tensor, h: torch.Tensor) -> float:
    """||E X||_F / ||D X||_F = sqrt(tr(E H E^T) / tr(D H D^T)): the error on the calibration activations."""
    hh = h.double()
    num = float(((err.double() @ hh) * err.double()).sum())
    den = float(((delta.double() @ hh) * delta.double()).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
