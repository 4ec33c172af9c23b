"""A synthetic merging benchmark for tests, `make demo` and benchmarks/tune_bench.py (needs transformers).

A tiny Llama base is pre-trained as a language model of "<marker> n n n ..." strings of random symbols (it
knows the format, answers no task: high entropy everywhere). Expert K is the base fine-tuned on its task,
"<tK> n n n x" -> f_K(x), f_K a fixed permutation of its own block of 8 symbols (n noise), with the base's
data as rehearsal, so it stays unsure outside its task as a real fine-tune does. Task vectors are genuine
fine-tuning deltas that interfere when added; accuracy on held-out prompts (fresh noise) measures a merge.
Everything is seeded: the same call writes the same models.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

SYMBOLS = [chr(ord("a") + i) for i in range(16)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TASKS = ["t0", "t1", "t2"]
VOCAB = SPECIALS + ["<copy>"] + [f"<{t}>" for t in TASKS] + SYMBOLS
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "vocab_size": 32, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
}  # fmt: skip
NOISE = 3


BLOCK = 8  # task k queries the symbols [8k, 8k + 8) (mod 16): each expert has its own domain


def permutation(task: int) -> dict[int, int]:
    """f_task over the task's block of symbols: symbol index -> symbol index."""
    start = (task * BLOCK) % len(SYMBOLS)
    order = list(range(start, start + BLOCK))
    random.Random(1000 + task).shuffle(order)
    return dict(zip(range(start, start + BLOCK), order))


def prompt(task: int | None, rng: random.Random) -> tuple[list[str], str]:
    """Words of one prompt and its answer (task None: a random query, answer itself; unused in training)."""
    x = rng.randrange(len(SYMBOLS)) if task is None else (task * BLOCK) % len(SYMBOLS) + rng.randrange(BLOCK)
    marker = "<copy>" if task is None else f"<{TASKS[task]}>"
    words = [marker] + [rng.choice(SYMBOLS) for _ in range(NOISE)] + [SYMBOLS[x]]
    answer = SYMBOLS[x] if task is None else SYMBOLS[permutation(task)[x]]
    return words, answer


def ids(words: list[str]) -> list[int]:
    return [VOCAB.index(w) for w in words]


def examples(task: int | None, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n prompts (token ids [n, 5]) and answers (ids [n])."""
    rng = random.Random(seed)
    rows = [prompt(task, rng) for _ in range(n)]
    return torch.tensor([ids(w) for w, _ in rows]), torch.tensor([VOCAB.index(a) for _, a in rows])


def _lm_loss(model, g: torch.Generator) -> torch.Tensor:
    """The base's "pre-training" data: a random marker then random symbols, next-symbol loss (uniform is
    optimal), so the base knows the format and answers no task: high entropy on every prompt."""
    first = len(SPECIALS)
    marker = torch.randint(first, first + 1 + len(TASKS), (64, 1), generator=g)
    x = torch.cat([marker, torch.randint(first + 1 + len(TASKS), len(VOCAB), (64, 7), generator=g)], 1)
    logits = model(input_ids=x).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _train(model, task: int | None, steps: int, seed: int, lr: float) -> None:
    """Base (task None): the LM loss above. Expert: its task's answers plus the base's data as rehearsal
    (a fine-tune keeps its general behaviour: it stays unsure on prompts outside its task)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        loss = _lm_loss(model, g)
        if task is not None:
            x, y = examples(task, 64, seed * 100_000 + s)
            loss = loss + torch.nn.functional.cross_entropy(model(input_ids=x).logits[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model, task: int, n: int = 256, seed: int = 999) -> float:
    """Held-out accuracy of the answer token (argmax at the last prompt position)."""
    x, y = examples(task, n, seed + task)
    with torch.no_grad():
        pred = model(input_ids=x).logits[:, -1].argmax(-1)
    return float((pred == y).float().mean())


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def _save(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if CONFIG.get("tie_word_embeddings"):  # a tied head is stored once, as HF does
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    write_tokenizer(folder)
    return folder


def new_model():
    import transformers

    cfg = transformers.LlamaConfig(
        **{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")}
    )
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg)


def build(folder: Path, base_steps: int = 30, expert_steps: int = 60, n_tasks: int = 2) -> dict:
    """Write base/, expert_t0/.. (fine-tuned), tune_data.jsonl (unlabeled prompts with task labels),
    nll_data.jsonl (prompt/completion) into folder; returns their paths."""
    folder = Path(folder)
    torch.manual_seed(0)
    base = new_model()
    _train(base, None, base_steps, seed=1, lr=1e-2)
    paths = {"base": _save(base, folder / "base"), "experts": []}
    start = {k: v.clone() for k, v in base.state_dict().items()}
    for t in range(n_tasks):
        torch.manual_seed(10 + t)
        base.load_state_dict(start)
        _train(base, t, expert_steps, seed=2 + t, lr=1e-2)
        paths["experts"].append(_save(base, folder / f"expert_{TASKS[t]}"))
    rng = random.Random(7)
    rows, nll_rows = [], []
    for t in range(n_tasks):
        for _ in range(32):
            words, answer = prompt(t, rng)
            rows.append({"text": " ".join(words), "task": TASKS[t]})
            nll_rows.append({"prompt": " ".join(words), "completion": answer, "task": TASKS[t]})
    paths["data"] = folder / "tune_data.jsonl"
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["nll_data"] = folder / "nll_data.jsonl"
    paths["nll_data"].write_text("".join(json.dumps(r) + "\n" for r in nll_rows))
    return paths


def load(state: dict[str, torch.Tensor]):
    model = new_model()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
