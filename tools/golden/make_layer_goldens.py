"""Per-layer goldens of the faithful mode: the mHC streams entering and leaving every block of the tiny V4
for a 48-token prompt (prefill), from v4_reference.py. A test that feeds each block the reference's input
checks the faithful rounding of one block at a time, which localizes a regression to a block. (Without
order-independent FP64 accumulation in both implementations, a last-bit difference of an FP32 sum becomes
a whole FP8 step of an element and such flips compound end to end; with it the blocks agree bit for bit.)

    .venv/bin/python tools/golden/make_layer_goldens.py --dir tests/model/testdata/tiny_v4 \
        --out tests/model/testdata/tiny_v4_layers
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

from v4_reference import Reference


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True, help="a directory of its own (a checkpoint dir loads every .safetensors)")
    ap.add_argument("--len", type=int, default=48)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    with open(os.path.join(args.dir, "golden.json")) as f:
        prompt = json.load(f)["fixtures"]["short"]["prompt"][:args.len]
    ref = Reference(args.dir, faithful=True)
    streams = []
    orig = ref.block

    def block(h, layer, p, ids, pos, st, hash_layer):
        if layer < ref.cfg["num_hidden_layers"]:
            streams.append(h.clone())
        out = orig(h, layer, p, ids, pos, st, hash_layer)
        if layer == ref.cfg["num_hidden_layers"] - 1:
            streams.append(out.clone())
        return out

    ref.block = block
    ref.forward(prompt, ref.new_state())
    tensors = {f"streams.{i}": s.to(torch.bfloat16).contiguous() for i, s in enumerate(streams)}
    # The streams of the faithful mode are BF16 values: storing them as BF16 is lossless.
    assert all(torch.equal(s.to(torch.bfloat16).float(), s) for s in streams)
    tensors["tokens"] = torch.tensor(prompt, dtype=torch.int64)
    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "faithful_layers.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
