#!/usr/bin/env python3
"""Writes the fuzz seed corpora (tests/model/fuzz/corpus/<target>/) from the committed fixtures.

Usage: python3 tools/tokenizer/make_fuzz_seeds.py   (from the repository root)
"""
import base64
import hashlib
import json
import os

ROOT = "tests/model"


def write(target, data):
    d = os.path.join(ROOT, "fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def main():
    parse_cases = [json.loads(l) for l in open(f"{ROOT}/testdata/chat/parse_cases.jsonl", encoding="utf-8")]
    for i, c in enumerate(parse_cases):
        text = c["completion"].encode()
        flag = (1 if c["thinking_mode"] == "thinking" else 0) | ((i % 16) << 1)
        write("dsml_parser", bytes([flag]) + text)
        write("dsml_parser", bytes([flag ^ 1]) + text[: len(text) // 2])  # cut mid-way, other mode
        write("dsml_parser", bytes([flag]) + text.replace(b"string=\"true\"", b"string=\"maybe\""))
    write("dsml_parser", b"\x00plain content with no markers")
    write("dsml_parser", b"\x01reasoning </thi</think>content\n\n<\xef\xbd\x9cDSML")

    corpus = [json.loads(l) for l in open(f"{ROOT}/testdata/tokenizer/corpus.jsonl", encoding="utf-8")]
    for c in corpus[:80]:
        write("streaming_decode", base64.b64decode(c["b64"])[:2000])

    for l in open(f"{ROOT}/testdata/chat/chat_cases.jsonl", encoding="utf-8"):
        c = json.loads(l)
        write("chat_render", json.dumps({"messages": c["messages"]}, ensure_ascii=False).encode())
    for body in [
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[]"}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "tool", "content": [{"type": "text", "text": 1}]}]},
    ]:
        write("chat_render", json.dumps(body).encode())


if __name__ == "__main__":
    main()
