#!/usr/bin/env python3
"""Accuracy of a served model on held-out generated tasks, through the OpenAI API of a running cluster.

The items are tools/train/tasks.py's eval_items (seed 12345 by default; training never sees that seed's
stream): key-value recall at 1k-8k tokens of context, multi-digit arithmetic, a `calculator` tool call
(the router's parsed `tool_calls` must hold exactly {"expression": "A * B"}), the answer after the tool's
result, and <｜title｜> quick-instruction titles. Every task goes to /v1/chat/completions; titles send the
finished exchange with `"v4serve": {"quick_instruction": "title"}` (docs/API.md).
Requests run concurrently (--concurrency); greedy decoding (temperature 0).

Either point it at a running router:
    python3 tools/eval/eval_api.py --base-url http://127.0.0.1:8080
or let it start one (`v4serve up` with any extra flags, so another serving path is one flag away):
    python3 tools/eval/eval_api.py --serve build/default/v4serve --model models/tiny-v4 [--serve-arg=--flag ...]
Prints a table per task and context length; --json writes the numbers; --require task=min (repeatable)
makes the exit status 1 when a task's accuracy is below min (for tests).
Needs only the Python standard library.
"""
import argparse
import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import tasks  # noqa: E402

MAX_TOKENS = {"recall": 8, "arith": 10, "tool_call": 80, "tool_answer": 24, "title": 24}


def post(base, path, body, timeout):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{path}: HTTP {e.code}: {e.read()[:300]!r}") from None


def run_item(base, model, it, timeout):
    t0 = time.time()
    if it["task"] == "title":
        r = post(base, "/v1/chat/completions", {"model": model, "messages": it["messages"],
                                                "v4serve": {"quick_instruction": "title"},
                                                "max_tokens": MAX_TOKENS["title"], "temperature": 0}, timeout)
        content, calls = r["choices"][0]["message"].get("content") or "", []
    else:
        body = {"model": model, "messages": it["messages"], "max_tokens": MAX_TOKENS[it["task"]],
                "temperature": 0}
        if it.get("tools"):
            body["tools"] = it["tools"]
        r = post(base, "/v1/chat/completions", body, timeout)
        msg = r["choices"][0]["message"]
        content = msg.get("content") or ""
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                 for c in msg.get("tool_calls") or []]
    return {"ok": tasks.score(it, content, calls), "prompt_tokens": r["usage"]["prompt_tokens"],
            "seconds": time.time() - t0, "got": content if not calls else calls}


def build_items(seed, n, n_recall, lengths, wanted):
    """The held-out items (tools/train/eval_torch.py --same-as-api builds the same list)."""
    # Recall items come first in eval_items and are drawn per length; other tasks after, n each.
    items = [it for it in tasks.eval_items(seed, n, lengths) if it["task"] != "recall" and it["task"] in wanted]
    if "recall" in wanted and n_recall:
        items = [it for it in tasks.eval_items(seed, n_recall, lengths) if it["task"] == "recall"] + items
    return items


def cell(it):
    return (it["task"], it["length"])


def evaluate(base, model, items, concurrency, timeout):
    results = collections.defaultdict(list)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futs = {pool.submit(run_item, base, model, it, timeout): it for it in items}
        for f in concurrent.futures.as_completed(futs):
            results[cell(futs[f])].append(f.result())
    return results


def table(results, title):
    lines = [f"### {title}", "", "| task | context (nominal tokens) | mean prompt tokens | n | accuracy |",
             "|---|---|---|---|---|"]
    for (task, length), rs in sorted(results.items()):
        acc = sum(r["ok"] for r in rs) / len(rs)
        mean_pt = sum(r["prompt_tokens"] for r in rs) / len(rs)
        lines.append(f"| {task} | {length or '-'} | {mean_pt:.0f} | {len(rs)} | {100 * acc:.1f}% |")
    return "\n".join(lines)


def start_cluster(binary, model_dir, extra):
    d = tempfile.mkdtemp(prefix="v4eval-")
    ready = os.path.join(d, "ready.json")
    cmd = [binary, "up", "--model=" + model_dir, "--http_port=0", "--grpc_port=0", "--ready_file=" + ready] + extra
    proc = subprocess.Popen(cmd, stdout=open(os.path.join(d, "up.log"), "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if os.path.exists(ready) and os.path.getsize(ready) > 0:
            with open(ready) as f:
                info = json.load(f)
            return proc, f"http://127.0.0.1:{info['http_port']}"
        if proc.poll() is not None:
            raise SystemExit(f"v4serve up exited with {proc.returncode}; see {d}/up.log")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("v4serve up did not become ready in 120 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running router, e.g. http://127.0.0.1:8080")
    ap.add_argument("--serve", help="v4serve binary: start `up` for the evaluation, stop it afterwards")
    ap.add_argument("--model", default="models/tiny-v4", help="with --serve: the checkpoint directory")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for `v4serve up` (repeatable)")
    ap.add_argument("--served-model-name", default=None, help="default: the first of /v1/models")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--n", type=int, default=50, help="items per task")
    ap.add_argument("--n-recall", type=int, default=20, help="recall items per context length")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--tasks", default="recall,arith,tool_call,tool_answer,title")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--label", default="up", help="name of the serving path, for the table")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--require", action="append", default=[], help="task=min_accuracy (0..1); repeatable")
    ap.add_argument("--repeat", type=int, default=1,
                    help="send the items this many times, one pass after another, and score the last pass "
                         "(its prompts' prefixes are cached by then: the reuse paths)")
    ap.add_argument("--reference", help="a reference table (tools/train/eval_torch.py --json) on the same items: "
                                        "fail where a cell's accuracy differs from it by more than --max-diff")
    ap.add_argument("--max-diff", type=float, default=0.01, help="with --reference: largest accuracy difference")
    args = ap.parse_args()
    if not args.base_url and not args.serve:
        ap.error("give --base-url or --serve")
    lengths = tuple(int(x) for x in args.lengths.split(",") if x)
    items = build_items(args.seed, args.n, args.n_recall, lengths, set(args.tasks.split(",")))
    proc = None
    base = args.base_url
    if args.serve:
        proc, base = start_cluster(args.serve, args.model, args.serve_arg)
    try:
        model = args.served_model_name
        if model is None:
            with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
                model = json.load(r)["data"][0]["id"]
        t0 = time.time()
        for _ in range(max(args.repeat, 1)):
            results = evaluate(base, model, items, args.concurrency, args.timeout)
        print(table(results, f"{args.label}: {base}, model {model}, {len(items)} items, "
                             f"{time.time() - t0:.0f} s"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    summary = {f"{t}@{l}" if t == "recall" else t: {"n": len(rs), "accuracy": sum(r["ok"] for r in rs) / len(rs),
                                                      "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rs) / len(rs)}
               for (t, l), rs in sorted(results.items())}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "results": summary,
                       "samples": {f"{t}@{l}": rs[:3] for (t, l), rs in results.items()}}, f, indent=1)
    failed = []
    for req in args.require:
        task, mn = req.split("=")
        accs = [v["accuracy"] for k, v in summary.items() if k == task or k.startswith(task + "@")]
        if not accs or min(accs) < float(mn):
            failed.append(f"{task}: {accs} < {mn}")
    if args.reference:
        with open(args.reference) as f:
            ref = json.load(f)
        for k, v in sorted(ref.items()):
            if k not in summary:
                failed.append(f"{k}: not evaluated")
            elif abs(summary[k]["accuracy"] - v["accuracy"]) > args.max_diff:
                failed.append(f"{k}: {summary[k]['accuracy']:.3f} vs reference {v['accuracy']:.3f}")
    if failed:
        print("REQUIREMENTS NOT MET: " + "; ".join(failed))
        sys.exit(1)
    print("requirements met" if args.require or args.reference else "")


if __name__ == "__main__":
    main()
