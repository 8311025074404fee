#!/usr/bin/env python3
"""Writes the tokenizer test corpus and the ids HF tokenizers produces for it.

Output: JSON lines {"name", "b64" (input bytes), "ids" (HF encode, add_special_tokens=False, of the bytes
decoded with errors="replace"), "decoded" (HF decode of those ids), "decoded_skip" (same with
skip_special_tokens=True)}. Deterministic (fixed seed).

Usage: .venv/bin/python tools/tokenizer/gen_tokenizer_fixtures.py \
           --tokenizer tests/model/testdata/tokenizer/tokenizer.json \
           --sample tools/tokenizer/sample_text.txt --out tests/model/testdata/tokenizer/corpus.jsonl
"""
import argparse
import base64
import json
import random

from tokenizers import Tokenizer


def hand_written(sample_lines):
    cases = [(f"sample_{i}", line.encode()) for i, line in enumerate(sample_lines)]
    cases += [
        ("empty", b""),
        ("space", b" "),
        ("spaces_run", b"a" + b" " * 37 + b"b"),
        ("spaces_end", b"end" + b" " * 9),
        ("tabs_newlines", b"x\t\t\n\n \n  \r\n\t y"),
        ("unicode_spaces", "a\u00a0b\u3000c\u2003d\u2028e\u0085f\u1680g\u202fh\u205fi\u180ej".encode()),
        ("whitespace_then_digits", b"   123   4567\n\n89"),
        ("digits_long", b"12345678901234567890"),
        ("digits_letters", b"abc123def4g5678h"),
        ("other_numbers", "\u0663\u0664\u0665 \u00bd\u00b2\u2167 \u2460\u2461 \uff11\uff12\uff13".encode()),
        ("cjk_runs", "中文English混合テキストカタカナひらがな한국어".encode()),
        ("cjk_punct", "你好，世界！「引用」『二重』。・ー".encode()),
        ("cjk_extension", "\u9fa5\u9fa6\u9fff\u3400\U00020000 \u3041\u309f\u30a0\u30ff".encode()),
        ("emoji_zwj", "👨‍👩‍👧‍👦👍🏽🇨🇳🏳️‍🌈".encode()),
        ("marks", "e\u0301\u0301 \u0301a \u0308\u0308x n\u0303".encode()),
        ("punct_letters", b"'s 're .Hello ,world !yes #tag @user $var"),
        ("punct_runs", b"!!! ??? ... --- *** ::: ;;;\n\n"),
        ("punct_crlf", b"end.\r\n\r\nnext;\n"),
        ("symbols", "∑∫√ €£¥ ©®™ ←→↑↓ ♠♥".encode()),
        ("controls", b"a\x00b\x01\x07c\x1bd\x7fe"),
        ("special_tokens", "<｜begin▁of▁sentence｜>Hi<｜User｜>q<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜>".encode()),
        ("special_adjacent", "<｜User｜><｜User｜>x<think><think>".encode()),
        ("special_partial", "<｜User｜ <think <｜DSML｜ ｜DSML｜invoke".encode()),
        ("dsml_block", "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"k\" string=\"true\">v</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>".encode()),
        ("long_spaces", b" " * 5000),
        ("long_letters", b"a" * 3000),
        ("long_mixed_word", b"ab" * 1500),
        ("long_cjk", ("的" * 2000).encode()),
        ("long_digits", b"9" * 1000),
        ("long_newlines", b"\n" * 300 + b"x"),
    ]
    invalid = [
        ("invalid_ff", b"ok\xff\xfeok"),
        ("invalid_truncated_2", b"ab\xc3"),
        ("invalid_truncated_3", b"ab\xe4\xb8 cd"),
        ("invalid_truncated_4", b"\xf0\x9f\x98x"),
        ("invalid_surrogate", b"a\xed\xa0\x80b"),
        ("invalid_overlong", b"a\xc0\xafb\xe0\x80\xafc"),
        ("invalid_above_max", b"\xf4\x90\x80\x80z"),
        ("invalid_lone_continuation", b"\x80\x80abc\xbf"),
        ("invalid_mixed", "中".encode() + b"\xe4" + "文".encode() + b"\xf0\x90" + b" end"),
    ]
    return cases + invalid


def random_cases(rng, count):
    pools = [
        (0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
        (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x2100, 0x23FF), (0x3000, 0x30FF),
        (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x0, 0x10FFFF),
    ]
    cases = []
    for i in range(count):
        chars = []
        for _ in range(rng.randint(1, 80)):
            lo, hi = rng.choice(pools)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0x41
            chars.append(chr(cp))
            if rng.random() < 0.15:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "1", "42", "'s", ".", "\r\n"]))
        cases.append((f"random_{i}", "".join(chars).encode()))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--sample", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=250)
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    with open(args.sample, encoding="utf-8", newline="") as f:
        sample_lines = f.read().splitlines(keepends=True)
    cases = hand_written(sample_lines) + random_cases(random.Random(20261123), args.random)
    with open(args.out, "w", encoding="utf-8") as out:
        for name, raw in cases:
            text = raw.decode("utf-8", errors="replace")
            ids = tok.encode(text, add_special_tokens=False).ids
            out.write(json.dumps({
                "name": name,
                "b64": base64.b64encode(raw).decode(),
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip": tok.decode(ids, skip_special_tokens=True),
            }, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
