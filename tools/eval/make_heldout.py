#!/usr/bin/env python3
"""Writes the held-out short tasks (arithmetic, calculator tool call and answer, <｜title｜>) as rendered
prompts and expected completions, for tests that run the C++ model without the router
(tests/model/tiny_model_accuracy_test.cc). Same items and seed as tools/eval/eval_api.py.

Usage: python3 tools/eval/make_heldout.py --n 40 --out tests/model/testdata/tiny_v4_heldout.jsonl
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
import tasks  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.out, "w", encoding="utf-8") as f:
        for it in tasks.eval_items(args.seed, args.n, recall_lengths=()):
            prompt = tasks.BOS + it["prompt"] if "prompt" in it else tasks.render_messages(it["messages"],
                                                                                         it.get("tools"))
            expect = it["expect"]
            if it["task"] == "tool_call":
                expect = tasks.dsml_call(expect["arguments"]["expression"])
            f.write(json.dumps({"task": it["task"], "prompt": prompt, "expect": expect}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
