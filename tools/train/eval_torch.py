"""Held-out accuracy of the PyTorch model (greedy), on the items tools/eval sends through the API."""
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


def evaluate(model, tok, dev, n_per_cell, lengths=(1024, 2048, 4096, 8192), only=None):
    model.eval()
    items = tasks.eval_items(EVAL_SEED, n_per_cell, lengths)
    cells = collections.defaultdict(lambda: [0, 0])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    for it in items:
        if only and it["task"] not in only:
            continue
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
