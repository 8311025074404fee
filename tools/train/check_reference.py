#!/usr/bin/env python3
"""Proves that the training forward (v4_train_model.TinyV4) is DeepSeek-V4 as tools/golden/v4_reference.py
computes it: random weights (also the biases, APE, sinks and mHC bases), a few short prompts, logits of
the main model and of the MTP block compared with the reference's exact mode (prefill path).

The configuration exercises every layer kind: sliding window only, CSA (ratio 4, lightning indexer with a
top-k smaller than the number of entries, so selection matters), HCA (ratio 8 here), hash and score routing,
mHC and MTP. Exit status 0 and "OK" when the largest difference is below 1e-4 relative to the logits' scale.

Usage: .venv/bin/python tools/train/check_reference.py
"""
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "golden"))
from v4_train_model import TinyV4  # noqa: E402

CFG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 4, "num_nextn_predict_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "qk_rope_head_dim": 16,
    "q_lora_rank": 48, "o_groups": 2, "o_lora_rank": 24, "sliding_window": 16,
    "compress_ratios": [0, 4, 8, 4, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 65536, "index_n_heads": 2, "index_head_dim": 32, "index_topk": 5,
    "moe_intermediate_size": 32, "n_routed_experts": 6, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "num_hash_layers": 1, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "norm_topk_prob": True,
    "topk_method": "noaux_tc", "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def main():
    torch.manual_seed(0)
    model = TinyV4(CFG, seed=1).double().float()
    with torch.no_grad():  # make the parameters that start at 0 or 1 matter
        for name in model.names:
            p = model.w(name)
            if name.endswith(("_base", "ape", "attn_sink", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith("_fn"):
                p.mul_(20)
        for l in range(1, CFG["num_hidden_layers"] + 1):
            getattr(model, f"route_bias_{l}").copy_(torch.randn(CFG["n_routed_experts"]) * 0.1)
    model.eval()
    from v4_reference import Reference
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(CFG, f)
        save_file({k: v.contiguous() for k, v in model.state_for_export().items()},
                  os.path.join(d, "model.safetensors"))
        ref = Reference(d, faithful=False)
        g = torch.Generator().manual_seed(2)
        for n in (16, 48, 64):
            ids = torch.randint(0, CFG["vocab_size"], (1, n), generator=g)
            nxt = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
            with torch.no_grad():
                logits, mtp, _ = model(ids, mtp_next_ids=nxt)
            st = ref.new_state()
            rl, streams = ref.forward(ids[0].tolist(), st)
            rm = ref.mtp(streams, nxt[0].tolist(), st)
            for what, a, b in (("logits", logits[0], rl), ("mtp", mtp[0], rm)):
                err = ((a - b).abs().max() / b.abs().max()).item()
                worst = max(worst, err)
                print(f"n={n:3d} {what:6s} max |diff| / max |ref| = {err:.2e}")
    ok = worst < 1e-4
    print("OK" if ok else "MISMATCH", f"(worst {worst:.2e})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
