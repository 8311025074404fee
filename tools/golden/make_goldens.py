"""Builds the tiny random DeepSeek-V4 of MODEL.md, writes it in the released checkpoint format (FP8 +
MXFP4) and records transformers' FP32 outputs on it as goldens for tests/model.

    .venv/bin/python tools/golden/make_goldens.py --out tests/model/testdata/tiny_v4

The reference is transformers' DeepseekV4ForCausalLM run in FP32 without a cache (a full forward per
step), on exactly the dequantized weights the checkpoint stores. index_topk covers every compressed entry
of the fixtures so that the comparison does not depend on how near-ties are broken.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import v4_checkpoint

LAYER_NAMES = {0: "sliding_attention", 4: "compressed_sparse_attention", 16: "heavily_compressed_attention"}


def tiny_config(index_topk):
    ratios = [0, 4, 16, 4]
    return DeepseekV4Config(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=128, partial_rotary_factor=0.5, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=16,
        layer_types=[LAYER_NAMES[r] for r in ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], index_n_heads=4, index_head_dim=128,
        index_topk=index_topk, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", swiglu_limit=10.0,
        hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
        compress_rope_theta=160000.0, max_position_embeddings=1048576,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        num_nextn_predict_layers=0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )


def randomize(model, seed):
    """Random weights with magnitudes that keep every path relevant (transformers' init zeroes some)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("hc.fn", "hc_fn")):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith(("hc.scale", "hc_scale")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith(("hc.base", "hc_base")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("position_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("tid2eid"):
            # Distinct experts per token.
            ne, k = model.config.n_routed_experts, model.config.num_experts_per_tok
            rows = [torch.randperm(ne, generator=g)[:k] for _ in range(b.shape[0])]
            b.copy_(torch.stack(rows))


@torch.no_grad()
def full_logits(model, ids):
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def greedy(model, ids, steps):
    ids = list(ids)
    out = []
    for _ in range(steps):
        nxt = int(full_logits(model, ids)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    model = DeepseekV4ForCausalLM(tiny_config(index_topk=512)).float().eval()
    model.config._attn_implementation = "eager"
    randomize(model, args.seed)
    tensors, back = v4_checkpoint.released_tensors(model, quantize=True)
    sd = model.state_dict()
    missing = set(sd) - set(back) - {k for k in sd if k.endswith("tid2eid")}
    assert not missing, missing
    for k, v in back.items():
        sd[k].copy_(v)
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    cfg = model.config.to_dict()
    released_cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 512,
        "hidden_size": 256, "num_hidden_layers": 4, "num_nextn_predict_layers": 0, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_groups": 2,
        "o_lora_rank": 64, "sliding_window": 16, "compress_ratios": [0, 4, 16, 4], "compress_rope_theta": 160000,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                         "beta_slow": 1},
        "max_position_embeddings": 1048576, "index_n_heads": 4, "index_head_dim": 128,
        "index_topk": cfg["index_topk"], "moe_intermediate_size": 128, "n_routed_experts": 8,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "num_hash_layers": 1, "scoring_func": "sqrtsoftplus",
        "routed_scaling_factor": 1.5, "norm_topk_prob": True, "topk_method": "noaux_tc", "swiglu_limit": 10.0,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "expert_dtype": "fp4",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "hidden_act": "silu",
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(released_cfg, f, indent=1)

    g = torch.Generator().manual_seed(args.seed + 1)
    fixtures = {"long": torch.randint(2, 512, (1100,), generator=g).tolist(),
                "short": torch.randint(2, 512, (150,), generator=g).tolist()}
    golden = {"reference": "transformers %s DeepseekV4ForCausalLM, FP32, no cache" % __import__("transformers").__version__,
              "fixtures": {}}
    for name, ids in fixtures.items():
        logits = full_logits(model, ids)
        n = len(ids)
        positions = sorted(set([0, 1, 3, 15, 16, 17, 63, 64, 127, 128, n // 2, n - 2, n - 1]))
        fx = {"prompt": ids, "positions": positions,
              "logits": [[round(float(v), 7) for v in logits[p]] for p in positions]}
        fx["greedy"] = greedy(model, ids, args.steps)
        golden["fixtures"][name] = fx
        print(name, "greedy", fx["greedy"][:16])
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(golden, f)


if __name__ == "__main__":
    main()
