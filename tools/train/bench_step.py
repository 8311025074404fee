#!/usr/bin/env python3
"""Training throughput of tools/train/train.py's step (eager; --modes eager,compile adds torch.compile
side by side).

    python3 tools/train/bench_step.py [--steps 8] [--lengths 640,2048,8192] [--modes eager,compile]

For each recall length: one step = a recall batch of --tokens-per-batch tokens + --short-rows short
conversations (as train.py makes them, fixed seed), forward + backward + AdamW. Prints per mode and length
the median step time, steps/s and peak memory, then the compiled/eager ratio, and the first compiled
step's time (compilation included)."""
import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from v4_train_model import TinyV4  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lengths", default="640,2048,8192")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--short-rows", type=int, default=64)
    ap.add_argument("--short-tokens", type=int, default=65536)
    ap.add_argument("--modes", default="eager",
                    help="eager and/or compile (torch.compile, dynamic shapes: on the H100 with torch 2.11 its "
                         "compilation did not finish in 400 s)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    enc = train.Encoder(train.TOKENIZER)
    cfg = train.model_config(enc.tok.get_vocab_size())
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(7)
    batches = {n: [train.make_batches(rng, enc, n, args.tokens_per_batch, cfg["sliding_window"], args.short_rows,
                                      args.short_tokens) for _ in range(3)] for n in lengths}
    results = {}
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        model = TinyV4(cfg).to(dev)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fwd = model
        if mode == "compile":
            torch._dynamo.config.recompile_limit = 32
            fwd = torch.compile(model, dynamic=True)
        for n in lengths:
            times = []
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.steps + 1):
                recall, micro = batches[n][i % 3]
                if dev == "cuda":
                    torch.cuda.synchronize()
                t = time.time()
                opt.zero_grad(set_to_none=True)
                train.backward_step(fwd, recall, micro, dev, amp)
                train.optimizer_step(model, opt)
                if dev == "cuda":
                    torch.cuda.synchronize()
                times.append(time.time() - t)
            med = statistics.median(times[1:])
            r = {"mode": mode, "recall_len": n, "recall_shape": list(batches[n][0][0][0].shape),
                 "short_shapes": [list(m[0].shape) for m in batches[n][0][1]], "first_step_s": round(times[0], 2),
                 "median_step_s": round(med, 4), "steps_per_s": round(1 / med, 2),
                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if dev == "cuda" else None}
            results[(mode, n)] = r
            print(json.dumps(r), flush=True)
    for n in lengths:
        if ("eager", n) in results and ("compile", n) in results:
            print(f"recall {n}: compiled/eager steps/s = "
                  f"{results[('eager', n)]['median_step_s'] / results[('compile', n)]['median_step_s']:.2f}x")


if __name__ == "__main__":
    main()
