#!/usr/bin/env python3
"""Builds the benchmark text: held-out Python source (not used for training) interleaved with the
multilingual sample, about 160 KB. The C++ bench and hf_speed.py repeat it to the same size.

Usage: python3 tools/tokenizer/make_bench_text.py --out tests/model/testdata/tokenizer/bench_text.txt \
           tools/tokenizer/sample_text.txt /usr/lib/python3.11/[i-l]*.py
"""
import argparse

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--size", type=int, default=160_000)
ap.add_argument("sample")
ap.add_argument("files", nargs="+")
args = ap.parse_args()
sample = open(args.sample, encoding="utf-8").read()
parts, total = [], 0
for path in sorted(args.files):
    text = open(path, encoding="utf-8", errors="replace").read()[:20_000]
    parts += [text, sample]
    total += len(text.encode()) + len(sample.encode())
    if total >= args.size:
        break
with open(args.out, "w", encoding="utf-8") as f:
    f.write("".join(parts))
