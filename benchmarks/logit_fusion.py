"""Logit fusion (merge-cli generate) on a synthetic weak-to-strong task, CPU, a few minutes.

    PYTHONPATH=. .venv/bin/python benchmarks/logit_fusion.py [--out bench-data/logit_fusion] [--steps 400]

Task family over digit tokens: "<task> d1 .. dn =" -> four answer digits then </s>, from the last digit
d = dn: rep (d d d d), up (d+1 .. d+4), down (d-1 .. d-4), all mod 10 (the digits before dn are
distractors; the tasks are chosen so that 2-layer models learn them in a few hundred CPU steps).
Models (tiny Llamas, one shared word-level tokenizer), trained here with fixed seeds:
  large   hidden 96, 4 layers, trained only on the GENERIC task: the same prompts, answers of four
          random digits (it learns the format and when to stop, not the mappings);
  base    hidden 48, 2 layers, the same generic training (the small experts' base);
  experts base fine-tuned on one task each (rep, up, down).
Measured: exact-match accuracy on held-out prompts (greedy) of the large alone, each expert alone, and
the fused large model (static weight 1 and dynamic), single-task and with all three experts on a mixed
set; decoding speed (tokens/s, batch 1, greedy) for 1, 2, 3 experts, static and dynamic, plus the large
model alone through the same loop. Writes results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

TASKS = ("rep", "up", "down")
ANSWER_LEN = 4
WORDS = [str(d) for d in range(10)] + list(TASKS) + ["="]


def answer(task: str, digits: list[int]) -> list[int]:
    d = digits[-1]
    step = {"rep": 0, "up": 1, "down": -1}[task]
    return [(d + step * (i + 1)) % 10 for i in range(ANSWER_LEN)]


def prompt_text(task, digits):
    return " ".join([task, *map(str, digits), "="])


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def new_model(hidden, layers, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


HELD_OUT: set = set()  # (task, digits) of the evaluation prompts: never trained on


def batch(tok, rng, tasks, generic: bool, size: int, lengths=(3, 6)):
    """Token ids and labels (-100 on the prompt) for a batch; generic answers are random digits."""
    seqs, labels = [], []
    while len(seqs) < size:
        task = rng.choice(tasks)
        d = [rng.randrange(10) for _ in range(rng.randint(*lengths))]
        if (task, tuple(d)) in HELD_OUT:
            continue
        ans = [rng.randrange(10) for _ in range(ANSWER_LEN)] if generic else answer(task, d)
        p = [1] + tok.convert_tokens_to_ids(prompt_text(task, d).split())
        a = tok.convert_tokens_to_ids([str(x) for x in ans]) + [2]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (n - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    return ids, lab, mask


def train(model, tok, tasks, generic, steps, seed, lr=3e-3, size=32, name=""):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = None
    for i in range(steps):
        ids, lab, mask = batch(tok, rng, tasks, generic, size)
        for g in opt.param_groups:  # linear warm-up then cosine-free constant
            g["lr"] = lr * min(1.0, (i + 1) / 20)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % 50 == 0:
            print(f"  train {name}: step {i + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    return float(loss)


def build_models(out: Path, steps: int, generic_steps: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    marker = out / f".complete-{generic_steps}-{steps}"
    paths = {k: out / k for k in ("large", "base", *TASKS)}
    if marker.exists():
        return paths
    torch.set_num_threads(2)
    tok = make_tokenizer(out / "tok")
    vocab = len(tok)
    log = {}
    large = new_model(96, 4, vocab, seed=1)
    log["large_generic_loss"] = train(large, tok, TASKS, True, generic_steps, seed=11, name="large")
    large.save_pretrained(paths["large"])
    tok.save_pretrained(paths["large"])
    base = new_model(48, 2, vocab, seed=2)
    log["base_generic_loss"] = train(base, tok, TASKS, True, generic_steps, seed=12, name="base")
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i, task in enumerate(TASKS):
        from transformers import AutoModelForCausalLM

        ex = AutoModelForCausalLM.from_pretrained(paths["base"])
        log[f"{task}_expert_loss"] = train(ex, tok, (task,), False, steps, seed=20 + i, lr=2e-3, name=task)
        ex.save_pretrained(paths[task])
        tok.save_pretrained(paths[task])
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    marker.write_text("ok")
    return paths


def eval_set(n_per_task: int, seed: int = 999, lengths=(3, 6)):
    rng = random.Random(seed)
    items = []
    for task in TASKS:
        seen = set()
        while len([x for x in items if x[0] == task]) < n_per_task:
            d = tuple(rng.randrange(10) for _ in range(rng.randint(*lengths)))
            if d in seen:
                continue
            seen.add(d)
            items.append((task, list(d)))
    return items


def decoder(paths, large, experts, mode, search="one_expert", base="base"):
    """A FusionDecoder; alone(m) = decoder(paths, m, [m], base=m): delta exactly 0, one model run."""
    from merge_cli.fusion.decode import DecodeOptions, FusionDecoder
    from merge_cli.fusion.preflight import check_models

    models = [("large", str(paths[large]), paths[large]), ("small base", base, paths[base])]
    models += [(f"expert {i + 1}", e, paths[e]) for i, e in enumerate(experts)]
    pre, tok = check_models(models)
    opts = DecodeOptions(mode=mode, weights=[1.0] * len(experts), search=search, max_new_tokens=10)
    return FusionDecoder(pre, tok, opts)


def accuracy(dec, items):
    ok, tokens, seconds = 0, 0, 0.0
    for task, d in items:
        g = dec.generate(prompt_text(task, d))
        ok += g.text.split() == [str(x) for x in answer(task, d)]
        tokens += len(g.token_ids) + (g.stopped == "eos")
        seconds += g.seconds
    return ok / len(items), tokens / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-data/logit_fusion"))
    ap.add_argument("--steps", type=int, default=400, help="training steps per expert")
    ap.add_argument(
        "--generic-steps", type=int, default=150, help="training steps of the large and base models"
    )
    ap.add_argument("--n", type=int, default=40, help="held-out prompts per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="speed rounds per setting")
    args = ap.parse_args()
    items = eval_set(args.n)
    HELD_OUT.update((t, tuple(d)) for t, d in items)
    t0 = time.perf_counter()
    paths = build_models(args.out, args.steps, args.generic_steps)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    by_task = {t: [x for x in items if x[0] == t] for t in TASKS}
    rows = []

    def add(name, dec, subset, models):
        acc, tps = accuracy(dec, subset)
        rows.append({"setting": name, "models_run": models, "accuracy": acc, "tokens_per_s": tps})
        print(f"{name:55s} acc {acc:6.1%}  {tps:7.1f} tok/s", flush=True)

    def alone(m):
        return decoder(paths, m, [m], "static", base=m)

    for task in TASKS:
        add(f"large alone, {task}", alone("large"), by_task[task], 1)
    for task in TASKS:
        add(f"{task} expert alone, {task}", alone(task), by_task[task], 1)
    for task in TASKS:
        for mode in ("static", "dynamic"):
            add(
                f"fused large + {task} expert ({mode}), {task}",
                decoder(paths, "large", [task], mode),
                by_task[task],
                3,
            )
    add("large alone, mixed", alone("large"), items, 1)
    for mode in ("static", "dynamic"):
        add(f"fused large + 3 experts ({mode}), mixed", decoder(paths, "large", list(TASKS), mode), items, 5)
    add(
        "fused large + 3 experts (dynamic, joint), mixed",
        decoder(paths, "large", list(TASKS), "dynamic", "joint"),
        items,
        5,
    )
    # speed: the same 30 prompts, `--repeats` rounds interleaved over the settings (a shared, loaded machine
    # slows some rounds); the best round of each setting is reported, with the median
    settings = [("large alone", 0, alone("large"))]
    for k in (1, 2, 3):
        for mode in ("static", "dynamic"):
            settings.append((mode, k, decoder(paths, "large", list(TASKS[:k]), mode)))
    rounds = {i: [] for i in range(len(settings))}
    for _ in range(args.repeats):
        for i, (_, _, dec) in enumerate(settings):
            rounds[i].append(accuracy(dec, items[:30])[1])
    speed = []
    for i, (mode, k, _) in enumerate(settings):
        r = sorted(rounds[i])
        speed.append(
            {
                "experts": k,
                "models": k + 2 if k else 1,
                "mode": mode,
                "tokens_per_s_best": r[-1],
                "tokens_per_s_median": r[len(r) // 2],
            }
        )
        print(f"speed: {k} experts, {mode}: best {r[-1]:.1f}, median {r[len(r) // 2]:.1f} tok/s", flush=True)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "speed_repeats": args.repeats,
        "train_steps": {"generic": args.generic_steps, "expert": args.steps},
        "train_seconds": round(train_s, 1),
        "eval_prompts_per_task": args.n,
        "accuracy": rows,
        "speed": speed,
        "train_log": json.loads((args.out / "train_log.json").read_text()),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
