#!/usr/bin/env python
"""Trains the embedded tiny reasoner (stepflow_ext/data/tiny_reasoner/) from a fixed seed on CPU.

A Qwen2ForCausalLM of a few million parameters learns the variable-substitution chains of
stepflow_ext.tiny.tasks (1..6 steps): the loss is on the completion tokens only (thinking
steps, "</think>", summary, end-of-text), AdamW with linear warm-up and a cosine decay.
Every --eval-every updates it greedy-decodes --dev-items dev problems (KV cache) and logs
the exact-match accuracy of the boxed answer. At the end it measures the whole test split
(in-distribution 2..6 steps and longer 8..12 steps), and writes

    OUT/                 model.safetensors, config.json, tokenizer files (save_pretrained)
    OUT/train_log.json   settings, loss and dev-accuracy curves, test accuracy per chain length
    --plot PNG           loss and dev accuracy against updates

The packaged model is two stages (1.64M parameters; the times are wall-clock on a shared
2-core machine with --threads 1, other jobs running; a quiet machine is faster):

    # stage 1: 1800 updates from seed 0 (~39 min here)
    PYTHONPATH=. python scripts/train_tiny_reasoner.py --out /tmp/tiny_stage1 --plot /tmp/stage1.png
    # stage 2: 600 more updates at a lower peak rate, from stage 1 (~12 min here)
    PYTHONPATH=. python scripts/train_tiny_reasoner.py --init /tmp/tiny_stage1 --updates 600 --lr 1e-3 \
        --warmup 50 --seed 1

A quick smoke run: --updates 100 --out /tmp/tiny --plot /tmp/tiny.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stepflow_ext.tiny import tasks  # noqa: E402
from stepflow_ext.tiny.model import PACKAGED_DIR, generate_completions, is_correct, new_model  # noqa: E402
from stepflow_ext.tiny.tokenizer import build_tokenizer  # noqa: E402


def encode(tok, problem):
    """(ids, labels): prompt tokens get label -100, completion + end-of-text are the targets."""
    prompt = tok(problem.prompt, add_special_tokens=False)["input_ids"]
    completion = tok(problem.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + completion, [-100] * len(prompt) + completion


def batches(encoded, batch_size, pad_id, rng):
    """Endless batches: shuffle, then sort 16 batches' worth by length so rows of a batch have
    similar lengths (little padding), then shuffle the batches."""
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        chunk = min(16, len(order) // batch_size) * batch_size
        for start in range(0, len(order) - chunk + 1, chunk):
            group = sorted(order[start:start + chunk], key=lambda i: len(encoded[i][0]))
            group_batches = [group[j:j + batch_size] for j in range(0, chunk, batch_size)]
            rng.shuffle(group_batches)
            for rows in group_batches:
                width = max(len(encoded[i][0]) for i in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                labels = torch.full((len(rows), width), -100, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    x, y = encoded[i]
                    ids[r, :len(x)] = torch.tensor(x)
                    labels[r, :len(y)] = torch.tensor(y)
                    mask[r, :len(x)] = 1
                yield ids, labels, mask


def accuracy(model, tok, items, batch_size=48):
    """Share of (problem, kind) items whose greedy completion boxes the right answer."""
    model.eval()
    completions = generate_completions(model, tok, [p for p, _ in items], batch_size=batch_size)
    model.train()
    return [is_correct(c, p.answer) for c, (p, _) in zip(completions, items)]


def lr_at(update, total, peak, warmup, floor=0.1):
    if update < warmup:
        return peak * (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def plot(log, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([r["update"] for r in log["loss"]], [r["loss"] for r in log["loss"]], color="tab:blue", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("train loss (completion tokens)", color="tab:blue")
    acc = ax.twinx()
    acc.plot([r["update"] for r in log["dev"]], [r["accuracy"] for r in log["dev"]], "o-", color="tab:red", ms=3)
    acc.set_ylim(0, 1.02)
    acc.set_ylabel("dev accuracy (1-6 steps)", color="tab:red")
    for stage in log.get("earlier_stages", []):   # mark where each later stage started
        ax.axvline(stage["loss"][-1]["update"] if stage["loss"] else 0, color="gray", ls=":", lw=1)
    ax.set_title("tiny reasoner training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=PACKAGED_DIR, help="where to save model + tokenizer (default: packaged)")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "tiny_reasoner_training.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", metavar="DIR", help="start from the model + tokenizer saved in DIR (a second stage; "
                        "the architecture options are then ignored)")
    # One thread by default: on a shared 2-core machine two threads stall at every op's barrier
    # (measured 9x slower per update here); on a quiet machine --threads 2 is faster.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--updates", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--train-items", type=int, default=40000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--dev-items", type=int, default=32)
    parser.add_argument("--test-per-steps", type=int, default=60, help="test items per chain length")
    args = parser.parse_args(argv)
    for name in ("updates", "batch_size", "layers", "hidden", "intermediate", "heads", "kv_heads", "train_items",
                 "eval_every", "dev_items", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()

    if args.init:   # a further stage: the model and tokenizer of an earlier run, a fresh schedule
        import transformers
        # the generic fast tokenizer: tokenizer.json as saved (AutoTokenizer would pick Qwen2Tokenizer,
        # which adds its own normalizer when saved again)
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(args.init, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.init, local_files_only=True, dtype=torch.float32)
    else:
        tok = build_tokenizer()
        model = new_model(len(tok), tok.eos_token_id, tok.pad_token_id, layers=args.layers, hidden=args.hidden,
                          intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads, seed=args.seed)
    splits = tasks.build_splits(args.train_items, 200, args.test_per_steps)
    encoded = [encode(tok, p) for p, _ in splits["train"]]
    if len(encoded) < args.batch_size:
        parser.error(f"--train-items ({args.train_items}) must be at least --batch-size ({args.batch_size})")
    dev = splits["dev"][:args.dev_items]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocab {len(tok)}, {len(encoded)} train items "
          f"(setup {time.time() - started:.1f}s)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    log = {"settings": vars(args) | {"parameters": n_params, "vocab": len(tok)}, "loss": [], "dev": []}
    offset = 0   # updates done by earlier stages: the curves continue their numbering
    if args.init and os.path.isfile(os.path.join(args.init, "train_log.json")):
        with open(os.path.join(args.init, "train_log.json")) as f:
            earlier = json.load(f)
        log["earlier_stages"] = earlier.pop("earlier_stages", []) + [earlier]
        offset = sum(stage["settings"]["updates"] for stage in log["earlier_stages"])
        log["loss"] = [r for stage in log["earlier_stages"] for r in stage["loss"]]
        log["dev"] = [r for stage in log["earlier_stages"] for r in stage["dev"]]
    model.train()
    stream = batches(encoded, args.batch_size, tok.pad_token_id, rng)
    tokens, window, train_time = 0, [], 0.0
    for update in range(args.updates):
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(update, args.updates, args.lr, args.warmup)
        ids, labels, mask = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.time() - t0
        tokens += int(mask.sum())
        window.append(loss.item())
        if (update + 1) % 20 == 0:
            log["loss"].append({"update": offset + update + 1, "loss": sum(window) / len(window)})
            print(f"update {update + 1}/{args.updates} loss {log['loss'][-1]['loss']:.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {tokens / train_time:.0f} tok/s "
                  f"elapsed {time.time() - started:.0f}s", flush=True)
            window = []
        if (update + 1) % args.eval_every == 0 or update + 1 == args.updates:
            t1 = time.time()
            hits = accuracy(model, tok, dev)
            log["dev"].append({"update": offset + update + 1, "accuracy": sum(hits) / len(hits)})
            print(f"  dev accuracy {log['dev'][-1]['accuracy']:.3f} ({len(hits)} items, {time.time() - t1:.1f}s)",
                  flush=True)

    log["train_seconds"] = train_time
    log["train_tokens"] = tokens
    t1 = time.time()
    hits = accuracy(model, tok, splits["test"])
    by_steps = {}
    for ok, (p, kind) in zip(hits, splits["test"]):
        by_steps.setdefault(p.num_steps, []).append(ok)
    log["test"] = {
        "by_steps": {str(k): sum(v) / len(v) for k, v in sorted(by_steps.items())},
        "in_distribution": sum(h for h, (_, k) in zip(hits, splits["test"]) if k == "in_distribution")
        / sum(k == "in_distribution" for _, k in splits["test"]),
        "longer": sum(h for h, (_, k) in zip(hits, splits["test"]) if k == "longer")
        / sum(k == "longer" for _, k in splits["test"]),
        "items_per_steps": args.test_per_steps,
    }
    log["total_seconds"] = time.time() - started
    print(f"test accuracy: in-distribution (2-6 steps) {log['test']['in_distribution']:.3f}, "
          f"longer (8-12 steps) {log['test']['longer']:.3f}; by steps {log['test']['by_steps']} "
          f"({time.time() - t1:.0f}s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.config.use_cache = True
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(log, args.plot)
    print(f"saved to {args.out} in {log['total_seconds']:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
