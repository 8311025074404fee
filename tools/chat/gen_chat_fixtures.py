#!/usr/bin/env python3
"""Generates the chat-encoding and completion-parsing fixtures from DeepSeek's reference script.

DeepSeek publishes encoding/encoding_dsv4.py as the definition of V4's prompt format (no Jinja
template). This tool imports it from a directory given on the command line (it is not part of our
repository), renders the conversations below with encode_messages(), tokenizes the prompts with HF
tokenizers, parses sample completions with parse_message_from_completion_text(), and writes:
  chat_cases.jsonl:  {"name", "messages", "thinking_mode", "reasoning_effort", "drop_thinking",
                      "prompt", "ids"}
  parse_cases.jsonl: {"name", "thinking_mode", "completion", "reasoning_content", "content",
                      "tool_calls": [{"name", "arguments"}]}

Usage:
  git --git-dir=$MIRROR show HEAD:encoding/encoding_dsv4.py > /tmp/dsv4/encoding_dsv4.py
  .venv/bin/python tools/chat/gen_chat_fixtures.py --encoding-dir /tmp/dsv4 \
      --tokenizer tests/model/testdata/tokenizer/tokenizer.json --out-dir tests/model/testdata/chat
"""
import argparse
import copy
import importlib
import json
import os
import sys

from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conversations import CONVERSATIONS, COMPLETIONS  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoding-dir", required=True, help="directory holding encoding_dsv4.py")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.encoding_dir)
    enc = importlib.import_module("encoding_dsv4")
    tok = Tokenizer.from_file(args.tokenizer)

    with open(os.path.join(args.out_dir, "chat_cases.jsonl"), "w", encoding="utf-8") as out:
        for case in CONVERSATIONS:
            kwargs = {"thinking_mode": case.get("thinking_mode", "chat")}
            if "reasoning_effort" in case:
                kwargs["reasoning_effort"] = case["reasoning_effort"]
            if "drop_thinking" in case:
                kwargs["drop_thinking"] = case["drop_thinking"]
            prompt = enc.encode_messages(copy.deepcopy(case["messages"]), **kwargs)
            out.write(json.dumps({
                "name": case["name"],
                "messages": case["messages"],
                "thinking_mode": kwargs["thinking_mode"],
                "reasoning_effort": case.get("reasoning_effort"),
                "drop_thinking": case.get("drop_thinking", True),
                "prompt": prompt,
                "ids": tok.encode(prompt, add_special_tokens=False).ids,
            }, ensure_ascii=False) + "\n")
    print(f"wrote {len(CONVERSATIONS)} chat cases")

    with open(os.path.join(args.out_dir, "parse_cases.jsonl"), "w", encoding="utf-8") as out:
        for case in COMPLETIONS:
            parsed = enc.parse_message_from_completion_text(case["completion"], thinking_mode=case["thinking_mode"])
            out.write(json.dumps({
                "name": case["name"],
                "thinking_mode": case["thinking_mode"],
                "completion": case["completion"],
                "reasoning_content": parsed["reasoning_content"],
                "content": parsed["content"],
                "tool_calls": [tc["function"] for tc in parsed["tool_calls"]],
            }, ensure_ascii=False) + "\n")
    print(f"wrote {len(COMPLETIONS)} parse cases")


if __name__ == "__main__":
    main()
