"""Hugging Face transformers (PyTorch eager, BF16) on the same V4-Flash-shaped stack that
bench/cuda_bench.cc times: 2 layers (CSA, HCA), hidden 4096, 64 heads of 512, 256 experts of 2048 (top-6),
vocab 129280; random weights (transformers' init), BF16 everywhere (transformers has no MXFP4 path).
Prints decode step time at each batch after a `--context`-token prefill, and prefill tokens/s, so that
docs/PERFORMANCE.md can put our tokens/s over theirs. Runs on the GPU machine (its python3 has torch and
transformers): python3 bench/hf_decode_bench.py [--batches 1,8,64] [--context 512] [--steps 5]
"""
import argparse
import sys
import time

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def flash_config(layers):
    names = ["compressed_sparse_attention", "heavily_compressed_attention"]
    return DeepseekV4Config(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=64,
        num_key_value_heads=1, head_dim=512, partial_rotary_factor=64 / 512, q_lora_rank=1024, o_groups=8,
        o_lora_rank=1024, sliding_window=128, layer_types=[names[i % 2] for i in range(layers)],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["moe"] * layers, index_n_heads=64, index_head_dim=128, index_topk=512,
        moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=6,
        routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", swiglu_limit=10.0, hc_mult=4,
        hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0,
        max_position_embeddings=1048576,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        num_nextn_predict_layers=0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.time()
    with torch.device("cuda"):
        model = DeepseekV4ForCausalLM(flash_config(a.layers)).eval()
    torch.cuda.synchronize()
    print("hf: transformers eager, bf16, %d layers, built in %.1f s, %.1f GiB" %
          (a.layers, time.time() - t0, torch.cuda.memory_allocated() / 2**30), flush=True)
    for b in [int(x) for x in a.batches.split(",")]:
        try:
            ids = torch.randint(2, 129280, (b, a.context), device="cuda")
            with torch.no_grad():
                torch.cuda.synchronize()
                t = time.time()
                out = model(ids, use_cache=True)
                torch.cuda.synchronize()
                pre = time.time() - t
                pkv = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                times = []
                for s in range(a.steps + 1):
                    torch.cuda.synchronize()
                    t = time.time()
                    out = model(nxt, past_key_values=pkv, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    if s > 0:
                        times.append(time.time() - t)
                    pkv = out.past_key_values
            times.sort()
            step = times[len(times) // 2]
            print("| hf decode step, batch %d, context %d | %.2f ms | %.0f tok/s | prefill %d x %d: %.0f tok/s |" %
                  (b, a.context, step * 1e3, b / step, b, a.context, b * a.context / pre), flush=True)
        except Exception as e:  # Report and go on with the next batch.
            print("hf batch %d failed: %s: %s" % (b, type(e).__name__, str(e)[:300]), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
