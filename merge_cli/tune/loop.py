"""The tuning loop: Adam over the coefficients only, a fixed-seed sampler, clamping, resumable state."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merge_cli.errors import MergeCliError
from merge_cli.tune.data import Example, collate
from merge_cli.tune.merged import MergedModel
from merge_cli.tune.objective import logits_of, loss_of


@dataclass
class TuneOptions:
    objective: str = "entropy"
    granularity: str = "layer"
    steps: int = 500
    lr: float = 1e-3
    batch: int = 16
    clamp: tuple[float, float] | None = (0.0, 1.0)
    seed: int = 0
    last_only: bool = False  # entropy on the last token of each text only
    save_every: int = 10


class Tuner:
    def __init__(self, merged: MergedModel, model, tasks: dict[str, list[Example]], opts: TuneOptions):
        self.merged, self.model, self.tasks, self.opts = merged, model, tasks, opts
        self.device = merged.device

    def loss(self, coeffs: torch.Tensor, batches: dict[str, list[Example]], params=None) -> torch.Tensor:
        """Mean over tasks of each task's objective on its batch, through the merged model for coeffs."""
        params = self.merged.merged(coeffs) if params is None else params
        losses = []
        for exs in batches.values():
            ids, mask, plen = collate(exs, self.device)
            logits = logits_of(self.model, params, ids, mask)
            losses.append(loss_of(self.opts.objective, logits, ids, mask, plen, self.opts.last_only))
        return torch.stack(losses).mean()

    def evaluate(self, coeffs: torch.Tensor, limit: int = 256) -> float:
        """The objective over (up to `limit` examples of) every task, without gradients: the mean over
        tasks of each task's mean over its examples (batches of 64)."""
        with torch.no_grad():
            params = self.merged.merged(coeffs)
            per_task = []
            for exs in self.tasks.values():
                chunks = [exs[i : i + 64] for i in range(0, min(len(exs), limit), 64)]
                vals = [float(self.loss(coeffs, {"t": c}, params)) * len(c) for c in chunks]
                per_task.append(sum(vals) / sum(len(c) for c in chunks))
        return sum(per_task) / len(per_task)

    def sample(self, gen: torch.Generator) -> dict[str, list[Example]]:
        out = {}
        for task, exs in self.tasks.items():
            n = len(exs)
            idx = torch.randperm(n, generator=gen)[: self.opts.batch] if n >= self.opts.batch else None
            if idx is None:
                idx = torch.randint(n, (self.opts.batch,), generator=gen)
            out[task] = [exs[i] for i in idx.tolist()]
        return out

    def run(
        self,
        start: torch.Tensor,
        state_path: Path | None = None,
        resume: bool = False,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[torch.Tensor, list[float]]:
        """Optimise from `start` (coefficients [groups, models]); returns them and the loss per step."""
        o = self.opts
        coeffs = torch.nn.Parameter(start.clone().to(self.device, torch.float64))  # exact in YAML
        opt = torch.optim.Adam([coeffs], lr=o.lr, betas=(0.9, 0.999))
        gen = torch.Generator().manual_seed(o.seed)
        step, history = 0, []
        if resume and state_path is not None and state_path.exists():
            step, history = self._load(state_path, coeffs, opt, gen)
        while step < o.steps:
            opt.zero_grad(set_to_none=True)
            loss = self.loss(coeffs, self.sample(gen))
            loss.backward()
            opt.step()
            if o.clamp is not None:
                with torch.no_grad():
                    coeffs.clamp_(o.clamp[0], o.clamp[1])
            step += 1
            history.append(float(loss.detach()))
            if on_step:
                on_step(step, history[-1])
            if state_path is not None and (step % o.save_every == 0 or step == o.steps):
                self._save(state_path, step, history, coeffs, opt, gen)
        return coeffs.detach().cpu(), history

    # -- resume state -----------------------------------------------------------------------------
    def _key(self) -> dict:
        o = asdict(self.opts)
        return {
            "groups": list(self.merged.groups),
            "models": list(self.merged.models or []),
            **{k: o[k] for k in ("objective", "granularity", "lr", "batch", "seed", "last_only")},
            "clamp": list(o["clamp"]) if o["clamp"] else None,
        }

    def _save(self, path: Path, step, history, coeffs, opt, gen) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {"key": self._key(), "step": step, "history": history, "coeffs": coeffs.detach().cpu(),
             "optim": opt.state_dict(), "rng": gen.get_state()},
            tmp,
        )  # fmt: skip
        os.replace(tmp, path)

    def _load(self, path: Path, coeffs, opt, gen):
        try:
            st = torch.load(path, weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise MergeCliError(
                f"{path}: cannot read the saved tune state ({type(e).__name__}); delete it"
            ) from None
        if st.get("key") != self._key():
            diff = next(k for k in self._key() if st.get("key", {}).get(k) != self._key()[k])
            raise MergeCliError(
                f"{path}: saved by a tune with another '{diff}'; rerun with the same options, or without --resume"
            )
        with torch.no_grad():
            coeffs.copy_(st["coeffs"])
        opt.load_state_dict(st["optim"])
        gen.set_state(st["rng"])
        return int(st["step"]), list(st["history"])
