#!/usr/bin/env python3
"""Converts DeepSeek's own encoding tests (encoding/tests/test_input_N.json + test_output_N.txt of the
fetched reference repository) into our chat_cases.jsonl format, outside the repository, so the C++ test
can check them too without committing DeepSeek's files:

  .venv/bin/python tools/chat/official_cases.py --tests-dir /tmp/dsv4/tests \
      --tokenizer tests/model/testdata/tokenizer/tokenizer.json --out /tmp/dsv4/official_cases.jsonl
  V4SERVE_CHAT_CASES=/tmp/dsv4/official_cases.jsonl build/default/tests/model/model_chat_encoder_test

The test directory holds in_N.json / out_N.txt as extracted with
  git --git-dir=$MIRROR show HEAD:encoding/tests/test_input_N.json > in_N.json  (same for outputs).
Case 4 is chat mode, the others thinking mode (as in test_encoding_dsv4.py).
"""
import argparse
import json
import os

from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--tests-dir", required=True)
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()
tok = Tokenizer.from_file(args.tokenizer)
with open(args.out, "w", encoding="utf-8") as out:
    for i in range(1, 5):
        data = json.load(open(os.path.join(args.tests_dir, f"in_{i}.json"), encoding="utf-8"))
        if isinstance(data, dict):  # case 1: tools given beside the messages, attached to the first one
            messages = data["messages"]
            messages[0]["tools"] = data["tools"]
        else:
            messages = data
        gold = open(os.path.join(args.tests_dir, f"out_{i}.txt"), encoding="utf-8").read()
        out.write(json.dumps({
            "name": f"official_{i}", "messages": messages, "thinking_mode": "chat" if i == 4 else "thinking",
            "reasoning_effort": None, "drop_thinking": True, "prompt": gold,
            "ids": tok.encode(gold, add_special_tokens=False).ids}, ensure_ascii=False) + "\n")
