"""Goldens of v4_reference.py (DeepSeek-style reference) on the tiny V4: the faithful numeric mode and MTP.

First checks the reference itself in exact mode against the transformers goldens (golden.json): logits
within 1e-4 and identical greedy tokens, through DeepSeek's prefill + one-token decode structure.

    .venv/bin/python tools/golden/make_ref_goldens.py --dir tests/model/testdata/tiny_v4
"""
import argparse
import ctypes
import ctypes.util
import json
import os

import torch

from v4_reference import Reference

DECODE_STEPS = (1, 16, 32, 63)  # decode steps whose logits the golden keeps


def check_rope_tables(ref):
    """The C++ side computes the RoPE frequencies as 1.0f / powf(base, 2i/d) with the C library; the
    reference's FP32 torch table must have the same bits, or the faithful goldens could not be matched."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.powf.restype, libm.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    c = ref.cfg
    dim = c["qk_rope_head_dim"]
    for base in (c["rope_theta"], c["compress_rope_theta"]):
        expo = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        want = torch.tensor([1.0 / libm.powf(base, float(e)) for e in expo.tolist()], dtype=torch.float32)
        got = 1.0 / (base ** expo)
        assert torch.equal(got, want), f"torch and libm disagree on the RoPE table of base {base}"


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def run(ref, prompt, positions, steps, with_mtp):
    st = ref.new_state()
    logits, streams = ref.forward(prompt, st)
    out = {"logits": [[round(float(v), 6) for v in logits[p]] for p in positions]}
    if with_mtp:
        # Draft logits at position t from the main streams at t and the embedding of token t+1.
        mtp = ref.mtp(streams[:-1], prompt[1:], st)
        out["mtp_positions"] = [p for p in positions if p < len(prompt) - 1]
        out["mtp_logits"] = [[round(float(v), 6) for v in mtp[p]] for p in out["mtp_positions"]]
    # Greedy decoding one token at a time; decode_logits[i] are the logits of decode step
    # decode_steps[i] (the step that consumed greedy[s - 1] and predicts greedy[s]).
    greedy, decode_logits = [], []
    decode_steps = [s for s in DECODE_STEPS if s < steps]
    nxt = int(logits[-1].argmax())
    for _ in range(steps):
        greedy.append(nxt)
        if len(greedy) == steps:
            break
        logits, _ = ref.forward([nxt], st)
        if len(greedy) in decode_steps:
            decode_logits.append([round(float(v), 6) for v in logits[-1]])
        nxt = int(logits[-1].argmax())
    out["greedy"] = greedy
    out["decode_steps"], out["decode_logits"] = decode_steps, decode_logits
    return out, logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    with open(os.path.join(args.dir, "golden.json")) as f:
        hf = json.load(f)["fixtures"]
    torch.set_grad_enabled(False)

    exact = Reference(args.dir, faithful=False)
    check_rope_tables(exact)
    for name, fx in hf.items():
        out, _ = run(exact, fx["prompt"], fx["positions"], len(fx["greedy"]), False)
        err = max(rel_err(torch.tensor(a), torch.tensor(b)) for a, b in zip(out["logits"], fx["logits"]))
        print(f"exact reference vs transformers, {name}: max relative logit error {err:.3g}; greedy "
              f"{'identical' if out['greedy'] == fx['greedy'] else 'DIFFERENT'}")
        assert err < 1e-4 and out["greedy"] == fx["greedy"], name

    with_mtp = exact.cfg.get("num_nextn_predict_layers", 0) > 0
    result = {"reference": "tools/golden/v4_reference.py (DeepSeek-style), checked against transformers in exact mode",
              "fixtures": {}}
    for mode, faithful in (("exact", False), ("faithful", True)):
        ref = exact if not faithful else Reference(args.dir, faithful=True)
        for name, fx in hf.items():
            if mode == "exact" and not with_mtp:
                continue
            out, _ = run(ref, fx["prompt"], fx["positions"], args.steps, with_mtp)
            out["prompt"], out["positions"] = fx["prompt"], fx["positions"]
            result["fixtures"][f"{name}_{mode}"] = out
            print(mode, name, "greedy", out["greedy"][:12])
    with open(os.path.join(args.dir, "golden_reference.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
