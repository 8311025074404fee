"""Writes a transformers DeepseekV4ForCausalLM state dict as a checkpoint in the released V4 format.

Tensor names are the released ones (embed.weight, layers.L.attn.wq_a.weight, ...); FP8 e4m3 weights with
E8M0 scales per 128x128 tile and MXFP4 routed experts (int8 [out, in/2], E8M0 per 32) follow MODEL.md and
DeepSeek's inference/convert.py. Quantization returns the dequantized values so the reference model can
be run on exactly the weights the checkpoint holds.
"""
import math

import torch

FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# Linear weights stored as FP8 in the released checkpoints (DeepSeek's Linear with the default fp8 dtype).
FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_b.weight",
                "indexer.wq_b.weight", "shared_experts.w1.weight", "shared_experts.w2.weight",
                "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
F32_SUFFIXES = ("attn_sink", "_fn", "_base", "_scale", "ape", "gate.bias")


def hf_to_released(name):
    """Maps a transformers parameter name to the released checkpoint name (None for expert stacks)."""
    n = name
    if n == "lm_head.weight":
        return "head.weight"
    n = n.removeprefix("model.")
    simple = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight",
              "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    if n in simple:
        return simple[n]
    reps = [
        (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".ffn_norm."),
        (".attn_hc.fn", ".hc_attn_fn"), (".attn_hc.base", ".hc_attn_base"), (".attn_hc.scale", ".hc_attn_scale"),
        (".ffn_hc.fn", ".hc_ffn_fn"), (".ffn_hc.base", ".hc_ffn_base"), (".ffn_hc.scale", ".hc_ffn_scale"),
        (".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
        (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
        (".self_attn.compressor.indexer.", ".attn.indexer.compressor."),
        (".self_attn.", ".attn."), (".mlp.", ".ffn."),
        (".sinks", ".attn_sink"), (".q_a_proj.", ".wq_a."), (".q_a_norm.", ".q_norm."), (".q_b_proj.", ".wq_b."),
        (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."),
        (".shared_experts.gate_proj.", ".shared_experts.w1."), (".shared_experts.up_proj.", ".shared_experts.w3."),
        (".shared_experts.down_proj.", ".shared_experts.w2."),
        (".gate.e_score_correction_bias", ".gate.bias"),
    ]
    for a, b in reps:
        n = n.replace(a, b)
    # Compressor leaves (attn.compressor.* and attn.indexer.compressor.*) and attention kv.
    n = n.replace(".kv_proj.", ".wkv.").replace(".gate_proj.", ".wgate.").replace(".position_bias", ".ape")
    if ".compressor." in n:
        n = n.replace(".kv_norm.", ".norm.")
    return n


def e8m0_scale(amax, qmax):
    """Power-of-two scale 2^ceil(log2(amax / qmax)) (DeepSeek's ue8m0 rounding), as (float, byte)."""
    amax = max(float(amax), 1e-30)
    e = math.ceil(math.log2(amax / qmax))
    e = max(min(e, 127), -127)
    return 2.0 ** e, e + 127


def quantize_fp8(w):
    """128x128 tile FP8: returns (fp8 tensor, uint8 scale bytes, dequantized float32)."""
    out, inp = w.shape
    so, si = (out + 127) // 128, (inp + 127) // 128
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    sb = torch.empty(so, si, dtype=torch.uint8)
    deq = torch.empty(out, inp, dtype=torch.float32)
    for i in range(so):
        for j in range(si):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s, b = e8m0_scale(tile.abs().max(), 448.0)
            qt = (tile / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qt
            sb[i, j] = b
            deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = qt.float() * s
    return q, sb, deq


def quantize_fp4(w):
    """MXFP4: e2m1 per element, E8M0 per 32 inputs. Returns (int8 packed [out, in/2], uint8 scales, dequantized)."""
    out, inp = w.shape
    blocks = w.float().view(out, inp // 32, 32)
    amax = blocks.abs().amax(-1).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scale = torch.pow(2.0, e)
    x = blocks / scale.unsqueeze(-1)
    mag = x.abs().clamp(max=6.0)
    # Nearest grid point; ties to the even code (index), like round-to-nearest-even.
    dist = (mag.unsqueeze(-1) - FP4_GRID).abs()
    best = dist.min(-1, keepdim=True).values
    cand = (dist == best)
    even_pref = cand & (torch.arange(8) % 2 == 0)
    idx = torch.where(even_pref.any(-1), even_pref.float().argmax(-1), cand.float().argmax(-1))
    code = idx | ((x < 0) & (idx > 0)).long() << 3
    deq = (FP4_GRID[idx] * torch.where(x < 0, -1.0, 1.0) * scale.unsqueeze(-1)).view(out, inp)
    code = code.view(out, inp)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, (e + 127).to(torch.uint8), deq


def released_tensors(model, quantize):
    """Returns ({released name: tensor to save}, {hf name: dequantized float tensor to load back})."""
    cfg = model.config
    inter = cfg.moe_intermediate_size
    out, back = {}, {}
    for hf_name, p in model.state_dict().items():
        p = p.detach()
        if hf_name.endswith("mlp.experts.gate_up_proj") or hf_name.endswith("mlp.experts.down_proj"):
            prefix = hf_to_released(hf_name.rsplit(".", 1)[0])  # ...ffn.experts
            deq_stack = torch.empty_like(p, dtype=torch.float32)
            for e in range(p.shape[0]):
                parts = ([("w1", p[e, :inter]), ("w3", p[e, inter:])] if hf_name.endswith("gate_up_proj")
                         else [("w2", p[e])])
                deq_parts = []
                for wn, w in parts:
                    name = f"{prefix}.{e}.{wn}.weight"
                    if quantize:
                        packed, sc, deq = quantize_fp4(w)
                        out[name], out[f"{prefix}.{e}.{wn}.scale"] = packed, sc.view(torch.float8_e8m0fnu)
                    else:
                        deq = w.to(torch.bfloat16).float()
                        out[name] = w.to(torch.bfloat16)
                    deq_parts.append(deq)
                deq_stack[e] = torch.cat(deq_parts, 0)
            back[hf_name] = deq_stack
            continue
        name = hf_to_released(hf_name)
        if name.endswith("tid2eid"):
            out[name] = p.to(torch.int64)
            continue
        if quantize and name.endswith(FP8_SUFFIXES):
            q, sc, deq = quantize_fp8(p.float())
            out[name] = q
            out[name.removesuffix(".weight") + ".scale"] = sc.view(torch.float8_e8m0fnu)
            back[hf_name] = deq
        elif name.endswith(F32_SUFFIXES):
            out[name] = p.float().contiguous()
            back[hf_name] = p.float()
        else:
            out[name] = p.to(torch.bfloat16).contiguous()
            back[hf_name] = out[name].float()
    return out, back
