#!/usr/bin/env python3
"""Where one forward's GPU time goes, kernel by kernel, from an Nsight Compute CSV.

The GPU machine has ncu but not nsys, so bench/gpu_run.sh times every kernel of a short bench run with
    V4SERVE_CUDA_GRAPHS=0 ncu --metrics gpu__time_duration.sum --csv --print-units base \
        .gpu/v4serve_cuda_bench --ceilings=0 --attention=0 --prefill= --batches=1 --steps=1 \
        --compare-state-cache=0 --compare-graphs=0 > ncu.csv
(graphs off, so that each kernel is its own launch) and this script cuts the launches into forwards at each
embedding kernel (a forward's first) and sums one forward's kernels by name. With --steps=1 the bench runs
a context prefill and three greedy decode steps first, so --forward 3 (the default) is a warm batch-1 decode
step. ncu runs each kernel alone with cold caches: small kernels read high, and the sum exceeds the step's
wall time. Usage: python3 bench/ncu_step.py ncu.csv [--forward K] [--top N]
"""
import argparse
import csv
import gzip
import io
import sys


def read_rows(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        lines = f.read().splitlines()
    # ncu prints its own "==PROF==" lines and the bench's stdout before the CSV header.
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu CSV header (a line starting with \"ID\")")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    for col in ("Kernel Name", "Metric Name", "Metric Value"):
        if col not in header:
            raise SystemExit(f"{path}: the CSV lacks the column {col!r}")
    name, metric, value = (header.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value"))
    out = []
    for r in rows[1:]:
        if len(r) != len(header) or r[metric] != "gpu__time_duration.sum":
            continue
        out.append((r[name], float(r[value].replace(",", "")) / 1e3))  # ns -> us
    return out


def short(kernel):
    base = kernel.split("(")[0]
    for prefix in ("void ", "kernels::<unnamed>::", "v4serve::<unnamed>::"):
        base = base.replace(prefix, "")
    return base[:70]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--forward", type=int, default=3, help="which forward, from 0 (default 3)")
    ap.add_argument("--top", type=int, default=25, help="kernel names to list (default 25)")
    args = ap.parse_args()
    rows = read_rows(args.csv)
    starts = [i for i, (k, _) in enumerate(rows) if short(k) == "Embed"]
    if args.forward < 0 or args.forward >= len(starts):
        raise SystemExit(f"{args.csv}: {len(starts)} forwards found, no forward {args.forward}")
    end = starts[args.forward + 1] if args.forward + 1 < len(starts) else len(rows)
    step = rows[starts[args.forward]:end]
    total = sum(t for _, t in step)
    by_name = {}
    for k, t in step:
        s = by_name.setdefault(short(k), [0.0, 0])
        s[0] += t
        s[1] += 1
    print(f"ncu, forward {args.forward} of {len(starts)}: {len(step)} kernels, {total:.1f} us summed")
    print("| kernel | launches | us | share |")
    print("|---|---|---|---|")
    for k, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {k} | {n} | {t:.1f} | {100 * t / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
