"""Held-out accuracy of the PyTorch model (greedy), on the items tools/eval sends through the API.

As a command it evaluates a checkpoint directory in the released format (dequantized weights, FP32, on the
CPU or a GPU) on exactly the items `tools/eval/eval_api.py` sends with the same flags, so a serving path's
table can be compared with the PyTorch model's cell by cell:
    .venv/bin/python tools/train/eval_torch.py --checkpoint models/tiny-v4 --tasks arith,title --n 50
"""
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

EVAL_SEED = 12345
MAX_NEW = {"recall": 6, "arith": 8, "tool_call": 64, "tool_answer": 24, "title": 24}


@torch.no_grad()
def greedy(model, ids, max_new, eos, dev, mult):
    ids = list(ids)
    out = []
    for _ in range(max_new):
        n = len(ids)
        padded = ids + [2] * ((-n) % mult)
        logits, _, _ = model(torch.tensor([padded], device=dev))
        nxt = int(logits[0, n - 1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def prompt_text(item):
    if "prompt" in item:
        return tasks.BOS + item["prompt"]
    return tasks.render_messages(item["messages"], item.get("tools"))


def evaluate(model, tok, dev, n_per_cell, lengths=(1024, 2048, 4096, 8192), only=None, deadline=None):
    """Greedy held-out accuracy per cell. Past `deadline` (time.time() seconds) the remaining items are
    skipped, so a run under a wall-clock limit still writes what it measured (cells count only the items
    evaluated)."""
    import time
    model.eval()
    items = tasks.eval_items(EVAL_SEED, n_per_cell, lengths)
    cells = collections.defaultdict(lambda: [0, 0])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    # Round-robin over the cells, so a deadline cuts every cell short rather than dropping whole cells.
    by_cell = collections.defaultdict(list)
    for it in items:
        by_cell[(it["task"], it["length"])].append(it)
    order = [c[i] for i in range(max(len(c) for c in by_cell.values())) for c in by_cell.values() if i < len(c)]
    for it in order:
        if only and it["task"] not in only:
            continue
        if deadline is not None and time.time() > deadline:
            break
        ids = tok.encode(prompt_text(it), add_special_tokens=False).ids
        with amp:
            out = greedy(model, ids, MAX_NEW[it["task"]], 1, dev, model.cfg["sliding_window"])
        text = tok.decode(out, skip_special_tokens=False)
        calls = tasks.parse_dsml_calls(text)
        content = text if not calls else ""
        ok = tasks.score(it, content, calls)
        key = f"{it['task']}@{it['length']}" if it["task"] == "recall" else it["task"]
        cells[key][0] += ok
        cells[key][1] += 1
    return {k: {"correct": v[0], "total": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(cells.items())}


def table(res):
    lines = ["| task | n | accuracy |", "|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v['total']} | {100 * v['accuracy']:.1f}% |")
    return "\n".join(lines)


def load_checkpoint(path, **config_overrides):
    """A checkpoint directory in the released format -> (model in eval mode on the GPU if there is one, else
    the CPU; FP32 dequantized weights), its tokenizer, its config (with `config_overrides` applied), device."""
    import json
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden"))
    from model_loader import dequantized
    from v4_train_model import TinyV4, load_released_state
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_overrides)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyV4(cfg)
    load_released_state(model, dequantized(load_file(os.path.join(path, "model.safetensors"))))
    return model.to(dev).eval(), tok, cfg, dev


def main():
    import argparse
    import json
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "eval"))
    import eval_api
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="models/tiny-v4")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--n-recall", type=int, default=20)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--tasks", default="recall,arith,tool_call,tool_answer,title")
    ap.add_argument("--json", help="write the table here (tools/eval/eval_api.py --reference reads it)")
    args = ap.parse_args()
    model, tok, cfg, dev = load_checkpoint(args.checkpoint)
    items = eval_api.build_items(args.seed, args.n, args.n_recall,
                                 tuple(int(x) for x in args.lengths.split(",") if x), set(args.tasks.split(",")))
    cells = collections.defaultdict(lambda: [0, 0])
    for it in items:
        ids = tok.encode(prompt_text(it), add_special_tokens=False).ids
        out = greedy(model, ids, MAX_NEW[it["task"]], cfg["eos_token_id"], dev, cfg["sliding_window"])
        text = tok.decode(out, skip_special_tokens=False)
        calls = tasks.parse_dsml_calls(text)
        key = f"{it['task']}@{it['length']}" if it["task"] == "recall" else it["task"]
        cells[key][0] += tasks.score(it, "" if calls else text, calls)
        cells[key][1] += 1
    res = {k: {"correct": v[0], "total": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(cells.items())}
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
