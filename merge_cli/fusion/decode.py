"""The decoding loop: one transformers causal LM per distinct model folder, each with its own KV cache
(past_key_values), logits fused per step (static weights or the dynamic solver), greedy or sampled.

A folder named in two roles (e.g. --large and --small-base the same) is loaded and run once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from merge_cli.errors import MergeCliError
from merge_cli.fusion.logit_fusion import candidate_grid, solve_dynamic, static_fuse
from merge_cli.fusion.preflight import Preflight, transformers_module

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DecodeOptions:
    mode: str = "dynamic"  # static | dynamic
    weights: list[float] | None = None  # static weights, one per expert
    alpha_max: float = 2.0
    alpha_step: float = 0.1
    search: str = "one_expert"
    max_kl: float | str | None = "auto"
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "max_new_tokens"

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": len(self.token_ids),
            "seconds": round(self.seconds, 4),
            "stopped": self.stopped,
            "steps": self.steps,
        }


class Runner:
    """One causal LM and its KV cache (transformers >= 5 names it `cache`, 4.x `past_key_values`)."""

    def __init__(self, model, vocab: int, device):
        import inspect

        self.model = model
        self.vocab = vocab
        self.device = device
        self.past = None
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # the prompt's prefill needs the last position's logits only (150k-token vocabularies x long prompts)
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.keep_last = {keep: 1} if keep else {}

    def _keep(self, out) -> torch.Tensor:
        self.past = getattr(out, self.cache_kw)
        return out.logits[0, -1, : self.vocab].float()

    @torch.no_grad()
    def start(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self._keep(self.model(input_ids=x, use_cache=True, **self.keep_last))

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        x = torch.tensor([[token]], dtype=torch.long, device=self.device)
        return self._keep(self.model(input_ids=x, use_cache=True, **{self.cache_kw: self.past}))


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeCliError(f"--device {device}: CUDA is not available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MergeCliError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None


class FusionDecoder:
    """Models loaded once; `generate` runs one prompt. Roles: large, small base, experts (in order)."""

    def __init__(self, pre: Preflight, tokenizer, opts: DecodeOptions):
        self.pre, self.tok, self.opts = pre, tokenizer, opts
        self.device = resolve_device(opts.device)
        tf = transformers_module()
        tf.utils.logging.disable_progress_bar()  # stdout/stderr carry the generated text and one summary
        tf.utils.logging.set_verbosity_error()
        dtype_kw = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
        self.runners: list[Runner] = []  # one per distinct folder
        self.role_index: list[int] = []  # per model in pre.models -> index into runners
        by_path: dict[str, int] = {}
        for m in pre.models:
            key = m.key
            if key not in by_path:
                source, kw = m.load_args()
                try:
                    model = tf.AutoModelForCausalLM.from_pretrained(
                        source, **kw, **{dtype_kw: DTYPES[opts.dtype]}
                    )
                except Exception as e:  # noqa: BLE001
                    first = (str(e).splitlines() or [""])[0][:160]
                    raise MergeCliError(
                        f"{m.role} '{m.ref}': transformers cannot load it ({type(e).__name__}: {first})"
                    ) from None
                model.to(self.device).eval()
                by_path[key] = len(self.runners)
                self.runners.append(Runner(model, pre.vocab, self.device))
            self.role_index.append(by_path[key])
        n_exp = len(pre.models) - 2
        if opts.mode == "static":
            w = opts.weights if opts.weights is not None else [1.0] * n_exp
            if len(w) == 1 and n_exp > 1:
                w = w * n_exp
            if len(w) != n_exp:
                raise MergeCliError(f"{len(w)} static weights given for {n_exp} experts; give one per expert")
            self.weights = [float(x) for x in w]
        else:
            self.grid = candidate_grid(n_exp, opts.alpha_max, opts.alpha_step, opts.search).to(self.device)

    @property
    def stop_ids(self) -> set[int]:
        """The tokenizer's EOS plus the large model's generation_config.json eos_token_id(s) (chat models)."""
        ids = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        gen = self.pre.models[0].path / "generation_config.json"
        try:
            val = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        except (OSError, ValueError, AttributeError):
            val = None
        for v in val if isinstance(val, list) else [val]:
            if isinstance(v, int):
                ids.add(v)
        return ids

    def _fuse(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        per_role = [logits[i] for i in self.role_index]
        large, base, experts = per_role[0], per_role[1], torch.stack(per_role[2:])
        if self.opts.mode == "static":
            return static_fuse(large, base, experts, self.weights), {"weights": self.weights}
        fused, step = solve_dynamic(large, base, experts, self.grid, self.opts.max_kl)
        return fused, step.to_json()

    def _pick(self, fused: torch.Tensor, gen: torch.Generator | None) -> int:
        if self.opts.temperature <= 0:
            return int(torch.argmax(fused))
        probs = torch.softmax(fused / self.opts.temperature, dim=-1).to("cpu")
        return int(torch.multinomial(probs, 1, generator=gen))

    def encode(self, prompt: str) -> list[int]:
        ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise MergeCliError(f"prompt {prompt[:40]!r} encodes to no tokens")
        return list(ids)

    def generate(self, prompt: str, on_text: Callable[[str], None] | None = None) -> Generation:
        ids = self.encode(prompt)
        gen = None
        if self.opts.temperature > 0:
            gen = torch.Generator().manual_seed(self.opts.seed)
        t0 = time.perf_counter()
        logits = [r.start(ids) for r in self.runners]
        out: list[int] = []
        steps: list[dict] = []
        shown = ""
        eos = self.stop_ids
        stopped = "max_new_tokens"
        for _ in range(self.opts.max_new_tokens):
            fused, info = self._fuse(logits)
            token = self._pick(fused, gen)
            info = {"token": token, **info}
            steps.append(info)
            if token in eos:
                stopped = "eos"
                break
            out.append(token)
            if on_text is not None:
                text = self.tok.decode(out, skip_special_tokens=True)
                if text.startswith(shown):
                    on_text(text[len(shown) :])
                    shown = text
            if len(out) == self.opts.max_new_tokens:
                break
            logits = [r.step(token) for r in self.runners]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        text = self.tok.decode(out, skip_special_tokens=True)
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown) :])
        return Generation(prompt, text, out, steps, seconds, stopped)
