"""An independent PyTorch reference of DeepSeek-V4 inference, written from reading DeepSeek's own
inference code for V4 (inference/model.py and the tilelang kernels), not copied from it.

It reads a checkpoint in the released format and runs in two numeric modes:
  * exact:    FP32 everywhere, no fake quantization (checked against transformers by make_ref_goldens.py);
  * faithful: the precision DeepSeek's code simulates -- activations BF16 between ops, the input of every
              FP8/FP4 GEMM rounded through FP8 e4m3 in blocks of 128 with power-of-two scales, window and
              compressed KV rounded through FP8 on the non-RoPE dims in blocks of 64, indexer queries and
              keys rotated by a 128-point Hadamard transform and rounded through FP4 e2m1 in blocks of 32,
              FP32 values for the compressor, router, mHC mixing, attention softmax and LM head.
In both modes every dot product, sum and transcendental is evaluated in FP64 and rounded once to FP32
("order-independent accumulation", docs/MODEL_NOTES.md): FP32 x FP32 products are exact in FP64 and the FP64
sum's own error almost never reaches the FP32 rounding, so each result is the correctly rounded FP32 value
whatever the summation order or the kernel (MKL, libm, vectorized exp...). The C++ faithful mode does the
same, which makes the FP8/BF16 roundings of the two implementations agree.
Like DeepSeek's code it has a prefill path (the whole prompt at once, start position 0) and a decode path
(one token at a time with explicit compressor state), and an MTP block. Unlike DeepSeek's code, every
sequence starts from a fresh state (DeepSeek's compressors keep state across prompts).
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_loader import dequantized

BF16 = torch.bfloat16
F64 = torch.float64


def mm(a, b):
    """a @ b in FP64 (exact products of FP32 values), rounded once to FP32."""
    return (a.double() @ b.double()).float()


def sigmoid64(x):
    return torch.sigmoid(x.double()).float()


def silu64(x):
    return F.silu(x.double()).float()


def rsqrt64(mean_square, eps):
    """1/sqrt(mean_square + eps) in FP64 (mean_square an FP64 tensor), rounded once to FP32."""
    return (1.0 / torch.sqrt(mean_square + eps)).float()


def pow2_ceil_scale(amax, qmax):
    """2^ceil(log2(amax * (1/qmax))) computed like the kernels' bit trick (exponent + (mantissa != 0))."""
    x = (amax * (1.0 / qmax)).float()
    bits = x.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()
    return torch.pow(2.0, e.float())


class Numerics:
    def __init__(self, faithful):
        self.faithful = faithful

    def bf(self, x):
        return x.to(BF16).float() if self.faithful else x

    def fp8_blocks(self, x, block):
        """FP8 e4m3 fake quantization in blocks along the last dim (amax clamped at 1e-4, pow2 scale)."""
        if not self.faithful:
            return x
        shape = x.shape
        b = x.float().reshape(*shape[:-1], shape[-1] // block, block)
        s = pow2_ceil_scale(b.abs().amax(-1, keepdim=True).clamp_min(1e-4), 448.0)
        q = (b / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        return q.reshape(shape)

    def fp4_blocks(self, x, block=32):
        if not self.faithful:
            return x
        shape = x.shape
        b = x.float().reshape(*shape[:-1], shape[-1] // block, block)
        s = pow2_ceil_scale(b.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0 ** -126), 6.0)
        v = (b / s).clamp(-6, 6)
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        mag = v.abs()
        d = (mag.unsqueeze(-1) - grid).abs()
        best = d.min(-1, keepdim=True).values
        cand = d == best
        even = cand & (torch.arange(8) % 2 == 0)
        idx = torch.where(even.any(-1), even.float().argmax(-1), cand.float().argmax(-1))
        q = grid[idx] * torch.sign(v) * s
        return q.reshape(shape)


def hadamard(x):
    n = x.shape[-1]
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (x.double() @ h.double() * (1.0 / math.sqrt(n))).float()


def rope_freqs(dim, base, yarn):
    # FP32 like DeepSeek's code (the only transcendental left in FP32: a constant table, identical to
    # glibc's 1.0f / powf(base, 2i/d) that the C++ side computes).
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is not None:
        factor, orig, beta_fast, beta_slow = yarn

        def corr(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def rope(x, pos, freqs, inverse=False):
    """Interleaved RoPE on the last 2*len(freqs) dims of x [..., n, (heads,) d] at positions pos [n]."""
    rd = 2 * freqs.numel()
    ang = pos.float()[:, None] * freqs[None, :]  # [n, rd/2], FP32 angles; cos, sin and rotation in FP64
    cos, sin = torch.cos(ang.double()), torch.sin(ang.double())
    if inverse:
        sin = -sin
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    r = x[..., -rd:].double()
    a, b = r[..., 0::2], r[..., 1::2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).float()
    return torch.cat([x[..., :-rd], out.to(x.dtype)], -1)


class Reference:
    def __init__(self, ckpt_dir, faithful=False, index_topk=None):
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            self.cfg = json.load(f)
        raw = load_file(os.path.join(ckpt_dir, "model.safetensors"))
        self.quantized = {n for n, t in raw.items() if t.dtype in (torch.float8_e4m3fn, torch.int8)}
        self.w = dequantized(raw)
        self.n = Numerics(faithful)
        c = self.cfg
        self.topk = index_topk or c["index_topk"]
        rs = c["rope_scaling"]
        self.freqs_main = rope_freqs(c["qk_rope_head_dim"], c["rope_theta"], None)
        self.freqs_comp = rope_freqs(c["qk_rope_head_dim"], c["compress_rope_theta"],
                                     (rs["factor"], rs["original_max_position_embeddings"], rs["beta_fast"],
                                      rs["beta_slow"]))
        self.eps = c["rms_norm_eps"]

    # ---- basic ops -------------------------------------------------------------------------------------
    def linear(self, x, name):
        """y = x W^T. FP8/FP4-stored weights take an FP8-quantized input (blocks of 128); outputs BF16."""
        if name in self.quantized:
            x = self.n.fp8_blocks(x, 128)
        return self.n.bf(mm(x, self.w[name].T))

    def rmsnorm(self, x, weight_name=None):
        x = x.float()
        y = x * rsqrt64(x.double().square().mean(-1, keepdim=True), self.eps)
        if weight_name is not None:
            y = self.w[weight_name] * y
        return self.n.bf(y)

    def ratio(self, layer):
        return self.cfg["compress_ratios"][layer]

    # ---- mHC -------------------------------------------------------------------------------------------
    def hc_pre(self, x, p, part):
        c = self.cfg
        hc = c["hc_mult"]
        flat = x.flatten(-2).float()
        rs = rsqrt64(flat.double().square().mean(-1, keepdim=True), self.eps)
        mixes = mm(flat, self.w[f"{p}hc_{part}_fn"].T) * rs
        scale, base = self.w[f"{p}hc_{part}_scale"], self.w[f"{p}hc_{part}_base"]
        eps = c["hc_eps"]
        pre = sigmoid64(mixes[..., :hc] * scale[0] + base[:hc]) + eps
        post = 2 * sigmoid64(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
        comb = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
        # Softmax and Sinkhorn in FP64, rounded once to FP32.
        comb = torch.softmax(comb.double(), -1) + eps
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
        for _ in range(c["hc_sinkhorn_iters"] - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + eps)
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
        comb = comb.float()
        y = (pre.unsqueeze(-1).double() * x.double()).sum(-2).float()
        return self.n.bf(y), post, comb

    def hc_post(self, out, residual, post, comb):
        y = post.unsqueeze(-1).double() * out.unsqueeze(-2).double() + \
            (comb.unsqueeze(-1).double() * residual.unsqueeze(-2).double()).sum(-3)
        return self.n.bf(y.float())

    def hc_head(self, x, p):
        flat = x.flatten(-2).float()
        rs = rsqrt64(flat.double().square().mean(-1, keepdim=True), self.eps)
        mixes = mm(flat, self.w[f"{p}hc_head_fn"].T) * rs
        pre = sigmoid64(mixes * self.w[f"{p}hc_head_scale"] + self.w[f"{p}hc_head_base"]) + self.cfg["hc_eps"]
        return self.n.bf((pre.unsqueeze(-1).double() * x.double()).sum(-2).float())

    # ---- MoE -------------------------------------------------------------------------------------------
    def expert(self, x, p, weights=None):
        lim = self.cfg["swiglu_limit"]
        gate = self.linear(x, p + "w1.weight").float()
        up = self.linear(x, p + "w3.weight").float()
        if lim > 0:
            up = up.clamp(-lim, lim)
            gate = gate.clamp(max=lim)
        h = silu64(gate) * up
        if weights is not None:
            h = weights * h  # DeepSeek applies the routing weight before w2 (transformers after).
        return self.linear(self.n.bf(h), p + "w2.weight")

    def moe(self, x, p, ids, hash_layer):
        c = self.cfg
        logits = mm(x, self.w[p + "gate.weight"].T)
        scores = torch.sqrt(F.softplus(logits.double())).float()
        if hash_layer:
            idx = self.w[p + "gate.tid2eid"][ids].long()
        else:
            idx = (scores + self.w[p + "gate.bias"]).topk(c["num_experts_per_tok"], -1).indices
        wts = scores.gather(-1, idx)
        wts = wts / wts.double().sum(-1, keepdim=True).float() * c["routed_scaling_factor"]
        y = torch.zeros_like(x, dtype=F64)  # The shared and routed outputs summed in FP64, rounded once.
        for e in range(c["n_routed_experts"]):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                y[rows] += self.expert(x[rows], f"{p}experts.{e}.", wts[rows, slot, None]).double()
        y = y + self.expert(x, p + "shared_experts.").double()
        return self.n.bf(y.float())

    # ---- attention ---------------------------------------------------------------------------------------
    def compress_entry(self, kv, score, p, ratio, width, pos0, indexer):
        """Pools one window (kv/score [slots, width] in FP32) and finishes the entry (norm, RoPE, rounding)."""
        e = (kv.double() * torch.softmax(score.double(), 0)).sum(0).float()
        e = self.rmsnorm(self.n.bf(e), p + "norm.weight")
        e = rope(e[None], torch.tensor([pos0]), self.freqs_comp)[0]
        e = self.n.bf(e)
        return self.finish_key(e, indexer)

    def finish_key(self, e, indexer):
        rd = self.cfg["qk_rope_head_dim"]
        if indexer:
            if self.n.faithful:
                e = self.n.fp4_blocks(self.n.bf(hadamard(e.float())), 32)
            return self.n.bf(e)
        return torch.cat([self.n.fp8_blocks(e[..., :-rd], 64), e[..., -rd:]], -1)

    def new_compressor_state(self, ratio, width):
        coff = 2 if ratio == 4 else 1
        return {"kv": torch.zeros(coff * ratio, coff * width),
                "score": torch.full((coff * ratio, coff * width), float("-inf")), "entries": []}

    def compressor_prefill(self, x, p, ratio, width, st, indexer):
        """DeepSeek's start_pos == 0 path: all complete windows at once; the tail goes to the state."""
        overlap = ratio == 4
        kv = mm(x, self.w[p + "wkv.weight"].T)
        score = mm(x, self.w[p + "wgate.weight"].T)
        ape = self.w[p + "ape"]
        s = x.shape[0]
        cutoff = s - s % ratio
        off = ratio if overlap else 0
        if overlap and cutoff >= ratio:
            st["kv"][:ratio] = kv[cutoff - ratio:cutoff]
            st["score"][:ratio] = score[cutoff - ratio:cutoff] + ape
        if s % ratio:
            st["kv"][off:off + s % ratio] = kv[cutoff:]
            st["score"][off:off + s % ratio] = score[cutoff:] + ape[:s % ratio]
        for w in range(cutoff // ratio):
            k = kv[w * ratio:(w + 1) * ratio]
            sc = score[w * ratio:(w + 1) * ratio] + ape
            if overlap:
                if w > 0:
                    pk = kv[(w - 1) * ratio:w * ratio, :width]
                    ps = score[(w - 1) * ratio:w * ratio, :width] + ape[:, :width]
                else:
                    pk = torch.zeros(ratio, width)
                    ps = torch.full((ratio, width), float("-inf"))
                k = torch.cat([pk, k[:, width:]], 0)
                sc = torch.cat([ps, sc[:, width:]], 0)
            st["entries"].append(self.compress_entry(k, sc, p, ratio, width, w * ratio, indexer))

    def compressor_decode(self, x, p, ratio, width, st, pos, indexer):
        overlap = ratio == 4
        kv = mm(x, self.w[p + "wkv.weight"].T)[0]
        score = mm(x, self.w[p + "wgate.weight"].T)[0] + self.w[p + "ape"][pos % ratio]
        slot = (ratio if overlap else 0) + pos % ratio
        st["kv"][slot], st["score"][slot] = kv, score
        if (pos + 1) % ratio:
            return
        if overlap:
            k = torch.cat([st["kv"][:ratio, :width], st["kv"][ratio:, width:]], 0)
            sc = torch.cat([st["score"][:ratio, :width], st["score"][ratio:, width:]], 0)
            st["kv"][:ratio], st["score"][:ratio] = st["kv"][ratio:].clone(), st["score"][ratio:].clone()
        else:
            k, sc = st["kv"], st["score"]
        st["entries"].append(self.compress_entry(k, sc, p, ratio, width, pos + 1 - ratio, indexer))

    def indexer_select(self, x, qr, p, pos, st):
        """Top-k compressed entries for each query (positions `pos`); ties go to the lower index."""
        c = self.cfg
        ih, idim, rd = c["index_n_heads"], c["index_head_dim"], c["qk_rope_head_dim"]
        q = self.linear(qr, p + "indexer.wq_b.weight").view(-1, ih, idim)
        q = self.n.bf(rope(q, pos, self.freqs_comp))
        if self.n.faithful:
            q = self.n.fp4_blocks(self.n.bf(hadamard(q)), 32)
        wts = self.linear(x, p + "indexer.weights_proj.weight") * (1.0 / math.sqrt(idim) / math.sqrt(ih))
        wts = self.n.bf(wts)
        keys = torch.stack(st["entries"]) if st["entries"] else torch.zeros(0, idim)
        sel = []
        for i in range(q.shape[0]):
            visible = (int(pos[i]) + 1) // 4
            if visible == 0:
                sel.append([])
                continue
            sc = self.n.bf(mm(q[i], keys[:visible].T))
            sc = self.n.bf((sc.relu().double() * wts[i, :, None].double()).sum(0).float())
            order = sorted(range(visible), key=lambda t: (-float(sc[t]), t))
            sel.append(order[:self.topk])
        return sel

    def attention(self, x, layer, p, pos, st):
        """x [n, D] (normed), positions pos [n] consecutive, st the layer state; returns [n, D]."""
        c = self.cfg
        h, hd, rd, win = c["num_attention_heads"], c["head_dim"], c["qk_rope_head_dim"], c["sliding_window"]
        ratio = self.ratio(layer)
        freqs = self.freqs_comp if ratio else self.freqs_main
        qr = self.rmsnorm(self.linear(x, p + "attn.wq_a.weight"), p + "attn.q_norm.weight")
        q = self.linear(qr, p + "attn.wq_b.weight").view(-1, h, hd)
        if self.n.faithful:
            ms = self.n.bf(self.n.bf(q.square()).double().mean(-1, keepdim=True).float())
            q = self.n.bf(q * self.n.bf(rsqrt64(ms.double(), self.eps)))
        else:
            q = q * rsqrt64(q.double().square().mean(-1, keepdim=True), self.eps)
        q = self.n.bf(rope(q, pos, freqs))
        kv = self.rmsnorm(self.linear(x, p + "attn.wkv.weight"), p + "attn.kv_norm.weight")
        kv = self.finish_key(self.n.bf(rope(kv, pos, freqs)), indexer=False)
        prefill = int(pos[0]) == 0
        # Compressors first (an entry completed by a token is visible to that token).
        if ratio:
            fn = self.compressor_prefill if prefill else None
            for name, width, key, idx in ((p + "attn.compressor.", hd, "comp", False),
                                          (p + "attn.indexer.compressor.", c["index_head_dim"], "icomp", True)):
                if idx and ratio != 4:
                    continue
                if prefill:
                    fn(x, name, ratio, width, st[key], idx)
                else:
                    self.compressor_decode(x, name, ratio, width, st[key], int(pos[0]), idx)
        sel = self.indexer_select(x, qr, p + "attn.", pos, st["icomp"]) if ratio == 4 else None
        # Window: the ring holds positions < pos[0]; this call's keys follow.
        outs = []
        for i in range(x.shape[0]):
            t = int(pos[i])
            keys = []
            for s_ in range(max(0, t - win + 1), t + 1):
                keys.append(kv[s_ - int(pos[0])] if s_ >= int(pos[0]) else st["window"][s_ % win])
            if ratio:
                visible = (t + 1) // ratio
                ids = sel[i] if ratio == 4 else range(visible)
                keys += [st["comp"]["entries"][j] for j in ids]
            k = torch.stack(keys).float()
            # Scores rounded once to FP32 from FP64; softmax with the sink and the weighted sum in FP64.
            logits = ((q[i].double() @ k.double().T) * (1.0 / math.sqrt(hd))).float()  # [h, n]
            sink = self.w[p + "attn.attn_sink"].float()
            m = torch.maximum(logits.max(-1).values, sink).double()
            e = torch.exp(logits.double() - m[:, None])
            o = (e @ k.double()) / (e.sum(-1) + torch.exp(sink.double() - m))[:, None]
            outs.append(self.n.bf(o.float()))
        o = torch.stack(outs)
        o = self.n.bf(rope(o, pos, freqs, inverse=True))
        for i in range(x.shape[0]):
            st["window"][int(pos[i]) % win] = kv[i]
        g, r = c["o_groups"], c["o_lora_rank"]
        wo_a = self.w[p + "attn.wo_a.weight"].view(g, r, -1)
        mid = self.n.bf(torch.einsum("sgd,grd->sgr", o.reshape(x.shape[0], g, -1).double(), wo_a.double()).float())
        return self.linear(mid.flatten(1), p + "attn.wo_b.weight")

    # ---- model -------------------------------------------------------------------------------------------
    def new_state(self):
        c = self.cfg
        layers = []
        for l in range(c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)):
            r = self.ratio(l)
            layers.append({"window": torch.zeros(c["sliding_window"], c["head_dim"]),
                           "comp": self.new_compressor_state(r, c["head_dim"]) if r else None,
                           "icomp": self.new_compressor_state(r, c["index_head_dim"]) if r == 4 else None})
        return {"pos": 0, "layers": layers}

    def block(self, h, layer, p, ids, pos, st, hash_layer):
        x, post, comb = self.hc_pre(h, p, "attn")
        x = self.rmsnorm(x, p + "attn_norm.weight")
        h = self.hc_post(self.attention(x, layer, p, pos, st), h, post, comb)
        x, post, comb = self.hc_pre(h, p, "ffn")
        x = self.rmsnorm(x, p + "ffn_norm.weight")
        return self.hc_post(self.moe(x, p + "ffn.", ids, hash_layer), h, post, comb)

    def forward(self, ids, state):
        """Runs `ids` (the whole prompt when state['pos'] == 0, else one token). Returns (logits [n, V], streams)."""
        c = self.cfg
        n = len(ids)
        assert state["pos"] == 0 or n == 1, "DeepSeek's structure: prefill from 0, then one token at a time"
        ids_t = torch.tensor(ids)
        pos = torch.arange(state["pos"], state["pos"] + n)
        h = self.n.bf(self.w["embed.weight"][ids_t]).unsqueeze(1).repeat(1, c["hc_mult"], 1)
        for l in range(c["num_hidden_layers"]):
            h = self.block(h, l, f"layers.{l}.", ids_t, pos, state["layers"][l], l < c["num_hash_layers"])
        state["pos"] += n
        return self.logits(h, ""), h

    def logits(self, h, p):
        x = self.rmsnorm(self.hc_head(h, p), p + "norm.weight")
        return mm(x, self.w["head.weight"].T)

    def mtp(self, streams, next_ids, state, k=0):
        """MTP block k: streams [n, hc, D] of the main model at positions pos..pos+n-1 and the ids of the
        following tokens; returns draft logits [n, V] (for the token after next)."""
        c = self.cfg
        p = f"mtp.{k}."
        layer = c["num_hidden_layers"] + k
        st = state["layers"][layer]
        n = len(next_ids)
        pos = torch.arange(state.setdefault("mtp_pos", 0), state["mtp_pos"] + n)
        ids_t = torch.tensor(next_ids)
        e = self.rmsnorm(self.n.bf(self.w["embed.weight"][ids_t]), p + "enorm.weight")
        hn = self.rmsnorm(streams, p + "hnorm.weight")
        h = self.n.bf(self.linear(e, p + "e_proj.weight").unsqueeze(1) + self.linear(hn, p + "h_proj.weight"))
        h = self.block(h, layer, p, ids_t, pos, st, False)
        state["mtp_pos"] += n
        return self.logits(h, p)
