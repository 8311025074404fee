#!/usr/bin/env python3
"""Measures HF tokenizers' single-threaded encode speed on the benchmark text and, when given the C++
bench binary, runs it on the same text and prints both and their ratio. Both figures are CPU time of
the process (Google Benchmark's default), so a machine shared with other jobs does not skew the ratio.

Usage: RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false .venv/bin/python tools/tokenizer/hf_speed.py \
           --tokenizer tests/model/testdata/tokenizer/tokenizer.json \
           --text tests/model/testdata/tokenizer/bench_text.txt --bench build/default/bench/v4serve_tokenizer_bench
"""
import argparse
import json
import os
import subprocess
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tokenizers import Tokenizer  # noqa: E402

REPEAT = 25  # the C++ bench repeats the text the same number of times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--bench", help="path of v4serve_tokenizer_bench")
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    text = open(args.text, encoding="utf-8").read() * REPEAT
    size = len(text.encode())
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        ids = tok.encode(text, add_special_tokens=False).ids
        best = min(best, time.process_time() - start)
    hf = {"BM_Encode": size / best / 1e6}
    print(f"HF tokenizers, one {size}-byte string: {hf['BM_Encode']:.1f} MB/s ({len(ids)} ids, best of 5)")
    chunks, cur = [], ""
    for line in text.splitlines(keepends=True):  # first newline past every 4 KiB, as the C++ bench
        cur += line
        if len(cur.encode()) >= 4096:
            chunks.append(cur)
            cur = ""
    if cur:
        chunks.append(cur)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for c in chunks:
            tok.encode(c, add_special_tokens=False)
        best = min(best, time.process_time() - start)
    hf["BM_EncodeChunks"] = size / best / 1e6
    print(f"HF tokenizers, {len(chunks)} chunks of ~4 KiB: {hf['BM_EncodeChunks']:.1f} MB/s (best of 5)")
    if args.bench:
        out = subprocess.run([args.bench, "--benchmark_filter=BM_Encode", "--benchmark_format=json",
                              f"--text={args.text}"], check=True, capture_output=True, text=True).stdout
        for b in json.loads(out)["benchmarks"]:
            ours = b["bytes_per_second"] / 1e6
            print(f"v4serve {b['name']}: {ours:.1f} MB/s, ratio to HF {ours / hf[b['name']]:.1f}x")


if __name__ == "__main__":
    main()
