#!/usr/bin/env python3
"""Teacher-forced diagnosis of recall misses: for each held-out recall item (the items tools/eval/eval_api.py
sends with the same flags), the model's greedy choice at each answer token (key, digit 1, 2, 3) given the
right tokens before it, and where the record sits in the context (tokens back from the question, position
within its 4-token CSA window). A greedy answer is right exactly when every teacher-forced choice is, so
this gives the same accuracy as eval_torch.py in one forward pass per item instead of one per token.

    .venv/bin/python tools/train/diagnose_recall.py --checkpoint models/tiny-v4 --lengths 8192 --n-recall 50
    ... --index-topk 100000    # the same with every compressed entry selected (is the indexer the cause?)
Prints one JSON line per item, then a summary of the misses by answer token.
"""
import argparse
import collections
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "eval"))


def main():
    import eval_api
    from eval_torch import EVAL_SEED, load_checkpoint, prompt_text
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="models/tiny-v4")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--n-recall", type=int, default=20)
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--index-topk", type=int, help="override the config's index_topk")
    args = ap.parse_args()
    model, tok, cfg, dev = load_checkpoint(
        args.checkpoint, **({"index_topk": args.index_topk} if args.index_topk else {}))
    items = eval_api.build_items(args.seed, 0, args.n_recall, tuple(int(x) for x in args.lengths.split(",")),
                                 {"recall"})
    miss = collections.Counter()
    right = collections.Counter()
    for it in items:
        prompt = tok.encode(prompt_text(it), add_special_tokens=False).ids
        answer = tok.encode(" " + it["expect"], add_special_tokens=False).ids
        ids = prompt + answer
        pad = (-len(ids)) % cfg["sliding_window"]
        with torch.no_grad():
            logits, _, _ = model(torch.tensor([ids + [2] * pad], device=dev))
        probs = torch.softmax(logits[0, len(prompt) - 1:len(ids) - 1].float(), -1)
        pred = probs.argmax(-1).tolist()
        pos = next((i for i in range(len(prompt) - len(answer) + 1) if prompt[i:i + len(answer)] == answer), -1)
        ok = pred == answer
        right[it["length"]] += ok
        for j, (p, a) in enumerate(zip(pred, answer)):
            miss[(it["length"], j)] += p != a
        print(json.dumps({"length": it["length"], "ok": ok, "want": it["expect"], "got": tok.decode(pred).strip(),
                          "p_right": [round(float(probs[j, a]), 3) for j, a in enumerate(answer)],
                          "tokens_back": len(prompt) - pos if pos >= 0 else None,
                          "pos_in_window": pos % 4 if pos >= 0 else None}), flush=True)
    n = collections.Counter(it["length"] for it in items)
    for length in sorted(n):
        per_tok = ", ".join(f"{name} {miss[(length, j)]}" for j, name in enumerate(("key", "d1", "d2", "d3")))
        print(f"recall@{length}: {right[length]}/{n[length]} right; misses by answer token: {per_tok}")


if __name__ == "__main__":
    main()
