#!/usr/bin/env python3
"""Writes trained weights (train.py's weights-*.safetensors, float32) as a checkpoint in the released V4
format: FP8 e4m3 with E8M0 scales per 128x128 tile for the dense linear weights DeepSeek stores in FP8,
MXFP4 (e2m1 + E8M0 per 32) for the routed experts, F32 for mHC/sinks/APE/routing bias, BF16 for the rest,
tid2eid as int64; plus config.json and tokenizer.json. The quantizers are tools/golden/v4_checkpoint.py's.

Usage: python tools/train/export.py --weights OUTDIR --out models/tiny-v4
"""
import argparse
import glob
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "golden"))
from v4_checkpoint import F32_SUFFIXES, FP8_SUFFIXES, quantize_fp4, quantize_fp8  # noqa: E402


def load_weights(d):
    w = {}
    for p in sorted(glob.glob(os.path.join(d, "weights-*.safetensors"))):
        w.update(load_file(p))
    return w


def released(weights):
    out = {}
    for name, t in sorted(weights.items()):
        if name.endswith("tid2eid"):
            out[name] = t.to(torch.int64).contiguous()
        elif ".experts." in name and ".shared_experts." not in name:
            packed, sc, _ = quantize_fp4(t.float())
            out[name] = packed.contiguous()
            out[name.removesuffix(".weight") + ".scale"] = sc.view(torch.float8_e8m0fnu).contiguous()
        elif name.endswith(FP8_SUFFIXES):
            q, sc, _ = quantize_fp8(t.float())
            out[name] = q.contiguous()
            out[name.removesuffix(".weight") + ".scale"] = sc.view(torch.float8_e8m0fnu).contiguous()
        elif name.endswith(F32_SUFFIXES):
            out[name] = t.float().contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="directory with weights-*.safetensors and config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=os.path.join(HERE, "..", "..", "models", "tiny-v4", "tokenizer.json"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tensors = released(load_weights(args.weights))
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.weights, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    if os.path.abspath(args.tokenizer) != os.path.abspath(os.path.join(args.out, "tokenizer.json")):
        shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"wrote {args.out}: {len(tensors)} tensors, model.safetensors {size / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
