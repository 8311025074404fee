"""DeepSeek-V4 for training: the same architecture and arithmetic as tools/golden/v4_reference.py in its exact
mode, written batched and vectorized so that it trains fast on a GPU.

Parameters carry the released checkpoint's names (embed.weight, layers.L.attn.wq_a.weight, ...), so export
is a rename-free quantization (tools/train/export.py). check_reference.py proves on random weights that
forward() and mtp_logits() equal the reference (prefill, exact mode) to float32 rounding.

What differs from the reference's code (not its result):
  * the sliding window is computed in query blocks of `sliding_window` against the previous block and
    their own (banded attention), the compressed entries as one masked [queries x entries] product, and
    both share one softmax with the attention sink;
  * compressors pool all complete windows at once (DeepSeek's prefill path, start position 0);
  * the indexer's top-k is a mask over entries (topk over visible entries, like the reference's sort);
  * routed experts run densely (every expert on every token, weighted by the routing mask), which is the
    same sum as gathering the routed tokens for each expert.
Training extras (not part of inference): `index_kl` returns the lightning indexer's distillation loss
(KL between the main attention over all visible compressed entries and the indexer's scores, as in
DeepSeek-V3.2's DSA training), and the routing bias of score-routed layers is updated without gradient
(auxiliary-loss-free balancing, `update_route_bias`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_freqs(dim, base, yarn):
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


def rope(x, cos, sin):
    """Interleaved RoPE on the last 2*cos.shape[-1] dims. x [B, N, (H,) d]; cos/sin [N, rd/2]."""
    rd = 2 * cos.shape[-1]
    while cos.dim() < x.dim() - 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    r = x[..., -rd:]
    a, b = r[..., 0::2], r[..., 1::2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    return torch.cat([x[..., :-rd], out], -1)


def rmsnorm(x, w, eps):
    y = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
    return y if w is None else y * w


class TinyV4(nn.Module):
    def __init__(self, cfg, seed=0):
        super().__init__()
        self.cfg = c = cfg
        g = torch.Generator().manual_seed(seed)
        D, H, hd, hc = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["hc_mult"]
        self.eps = c["rms_norm_eps"]
        params = {}

        def lin(name, out, inp, std=None):
            params[name] = torch.randn(out, inp, generator=g) * (std if std is not None else inp ** -0.5)

        def ones(name, n):
            params[name] = torch.ones(n)

        def zeros(name, *shape):
            params[name] = torch.zeros(*shape)

        lin("embed.weight", c["vocab_size"], D, 1.0)
        lin("head.weight", c["vocab_size"], D, D ** -0.5)
        ones("norm.weight", D)
        self._hc_head(params, "", lin, zeros)
        n_layers = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)
        self.tid2eid = []
        for l in range(n_layers):
            p = f"layers.{l}." if l < c["num_hidden_layers"] else f"mtp.{l - c['num_hidden_layers']}."
            ratio = c["compress_ratios"][l]
            for part in ("attn", "ffn"):
                lin(f"{p}hc_{part}_fn", (2 + hc) * hc, hc * D, 0.02 * (hc * D) ** -0.5)
                params[f"{p}hc_{part}_scale"] = torch.ones(3)
                zeros(f"{p}hc_{part}_base", (2 + hc) * hc)
            ones(p + "attn_norm.weight", D)
            ones(p + "ffn_norm.weight", D)
            a = p + "attn."
            lin(a + "wq_a.weight", c["q_lora_rank"], D)
            ones(a + "q_norm.weight", c["q_lora_rank"])
            lin(a + "wq_b.weight", H * hd, c["q_lora_rank"])
            lin(a + "wkv.weight", hd, D)
            ones(a + "kv_norm.weight", hd)
            zeros(a + "attn_sink", H)
            g_, r_ = c["o_groups"], c["o_lora_rank"]
            lin(a + "wo_a.weight", g_ * r_, H * hd // g_)
            lin(a + "wo_b.weight", D, g_ * r_, (g_ * r_) ** -0.5 * 0.5)
            if ratio:
                coff = 2 if ratio == 4 else 1
                for cp, width in ((a + "compressor.", hd),) + (((a + "indexer.compressor.", c["index_head_dim"]),)
                                                               if ratio == 4 else ()):
                    lin(cp + "wkv.weight", coff * width, D)
                    lin(cp + "wgate.weight", coff * width, D)
                    zeros(cp + "ape", ratio, coff * width)
                    ones(cp + "norm.weight", width)
                if ratio == 4:
                    lin(a + "indexer.wq_b.weight", c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"])
                    lin(a + "indexer.weights_proj.weight", c["index_n_heads"], D)
            f = p + "ffn."
            E, I = c["n_routed_experts"], c["moe_intermediate_size"]
            lin(f + "gate.weight", E, D)
            hash_layer = l < c["num_hash_layers"]
            if hash_layer:
                t = torch.stack([torch.randperm(E, generator=g)[:c["num_experts_per_tok"]]
                                 for _ in range(c["vocab_size"])])
                self.register_buffer(f"tid2eid_{l}", t)
            else:
                self.register_buffer(f"route_bias_{l}", torch.zeros(E))
            # Experts stacked [E, out, in] for the dense computation; exported per expert.
            params[f + "experts.w1"] = torch.randn(E, I, D, generator=g) * D ** -0.5
            params[f + "experts.w3"] = torch.randn(E, I, D, generator=g) * D ** -0.5
            params[f + "experts.w2"] = torch.randn(E, D, I, generator=g) * I ** -0.5 * 0.5
            lin(f + "shared_experts.w1.weight", I, D)
            lin(f + "shared_experts.w3.weight", I, D)
            lin(f + "shared_experts.w2.weight", D, I, I ** -0.5 * 0.5)
            if p.startswith("mtp."):
                for nm in ("enorm", "hnorm", "norm"):
                    ones(p + nm + ".weight", D)
                lin(p + "e_proj.weight", D, D)
                lin(p + "h_proj.weight", D, D)
                self._hc_head(params, p, lin, zeros)
        self.names = sorted(params)
        # Quantization-aware training: when set, w() returns the weights as the released checkpoint stores
        # them (FP8 128x128 tiles, MXFP4 experts; straight-through gradients), so the exported model is the
        # one that was trained.
        self.qat = False
        # Training only: [B, N] bool of the positions whose indexer KL counts twice (the answers).
        self.kl_focus = None
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in params.items()})
        rs = c["rope_scaling"]
        self.register_buffer("freqs_main", rope_freqs(c["qk_rope_head_dim"], c["rope_theta"], None))
        self.register_buffer("freqs_comp", rope_freqs(
            c["qk_rope_head_dim"], c["compress_rope_theta"],
            (rs["factor"], rs["original_max_position_embeddings"], rs["beta_fast"], rs["beta_slow"])))

    def _hc_head(self, params, p, lin, zeros):
        _hc_head_init(params, p, lin, zeros, self.cfg)

    def w(self, name):
        t = self.params[name.replace(".", "__")]
        if self.qat:
            if ".experts.w" in name and ".shared_experts." not in name:
                return t + (fake_quant_fp4(t) - t).detach()
            if name.endswith(FP8_SUFFIXES):
                return t + (fake_quant_fp8(t) - t).detach()
            if not name.endswith(F32_SUFFIXES):
                return t + (t.to(torch.bfloat16).float() - t).detach()
        return t

    def state_for_export(self):
        """{released name: float32 tensor} (experts unstacked) plus tid2eid, the checkpoint's content."""
        out = {}
        c = self.cfg
        for name in self.names:
            t = self.w(name).detach().float().cpu()
            if ".experts.w" in name:
                prefix, wn = name.rsplit(".", 1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.{wn}.weight"] = t[e].contiguous()
            else:
                out[name] = t
        for l in range(c["num_hidden_layers"]):
            if l < c["num_hash_layers"]:
                out[f"layers.{l}.ffn.gate.tid2eid"] = getattr(self, f"tid2eid_{l}").cpu().long()
            else:
                out[f"layers.{l}.ffn.gate.bias"] = getattr(self, f"route_bias_{l}").float().cpu()
        for k in range(c.get("num_nextn_predict_layers", 0)):
            l = c["num_hidden_layers"] + k
            out[f"mtp.{k}.ffn.gate.bias"] = getattr(self, f"route_bias_{l}").float().cpu()
        return out

    # ---- mHC ---------------------------------------------------------------------------------------------
    def hc_pre(self, x, p, part):
        c = self.cfg
        hc, eps = c["hc_mult"], c["hc_eps"]
        flat = x.flatten(-2).float()
        rs = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)
        mixes = (flat @ self.w(f"{p}hc_{part}_fn").float().T) * rs
        scale, base = self.w(f"{p}hc_{part}_scale"), self.w(f"{p}hc_{part}_base")
        pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
        post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
        comb = mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
        comb = torch.softmax(comb, -1) + eps
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
        for _ in range(c["hc_sinkhorn_iters"] - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + eps)
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
        y = (pre.unsqueeze(-1) * x.float()).sum(-2)
        return y, post, comb

    @staticmethod
    def hc_post(out, residual, post, comb):
        return post.unsqueeze(-1) * out.float().unsqueeze(-2) + torch.einsum("...ij,...id->...jd", comb,
                                                                             residual.float())

    def hc_head(self, x, p):
        flat = x.flatten(-2).float()
        rs = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)
        mixes = (flat @ self.w(f"{p}hc_head_fn").float().T) * rs
        pre = torch.sigmoid(mixes * self.w(f"{p}hc_head_scale") + self.w(f"{p}hc_head_base")) + self.cfg["hc_eps"]
        return (pre.unsqueeze(-1) * x.float()).sum(-2)

    # ---- MoE ---------------------------------------------------------------------------------------------
    def _swiglu(self, gate, up):
        lim = self.cfg["swiglu_limit"]
        if lim > 0:
            up = up.clamp(-lim, lim)
            gate = gate.clamp(max=lim)
        return F.silu(gate) * up

    def moe(self, x, p, ids, layer):
        c = self.cfg
        E, k = c["n_routed_experts"], c["num_experts_per_tok"]
        f = p + "ffn."
        logits = x.float() @ self.w(f + "gate.weight").float().T
        scores = torch.sqrt(F.softplus(logits))
        if layer < c["num_hash_layers"]:
            idx = getattr(self, f"tid2eid_{layer}")[ids]
        else:
            idx = (scores + getattr(self, f"route_bias_{layer}")).topk(k, -1).indices
        wts = scores.gather(-1, idx)
        wts = wts / wts.sum(-1, keepdim=True) * c["routed_scaling_factor"]
        dense_w = torch.zeros_like(scores).scatter_add(-1, idx, wts)  # [B, N, E]
        gate = torch.einsum("bnd,eid->bnei", x, self.w(f + "experts.w1"))
        up = torch.einsum("bnd,eid->bnei", x, self.w(f + "experts.w3"))
        h = self._swiglu(gate.float(), up.float()) * dense_w.unsqueeze(-1)
        y = torch.einsum("bnei,edi->bnd", h.to(gate.dtype), self.w(f + "experts.w2")).float()
        sg = x @ self.w(f + "shared_experts.w1.weight").T
        su = x @ self.w(f + "shared_experts.w3.weight").T
        y = y + (self._swiglu(sg.float(), su.float()).to(sg.dtype) @ self.w(f + "shared_experts.w2.weight").T).float()
        if self.training and layer >= c["num_hash_layers"]:
            self._loads.append((layer, torch.zeros(E, device=x.device).scatter_add(
                0, idx.flatten(), torch.ones(idx.numel(), device=x.device)).detach()))
        return y

    # ---- attention ---------------------------------------------------------------------------------------
    def compress(self, x, cp, ratio, width, cos, sin):
        """All complete windows of x [B, N, D] -> entries [B, N//ratio, width] (prefill path, pos0 = 0)."""
        B, N, _ = x.shape
        overlap = ratio == 4
        nw = N // ratio
        kv = (x @ self.w(cp + "wkv.weight").T).float()[:, :nw * ratio].view(B, nw, ratio, -1)
        sc = (x @ self.w(cp + "wgate.weight").T).float()[:, :nw * ratio].view(B, nw, ratio, -1)
        sc = sc + self.w(cp + "ape")
        if overlap:
            pk = F.pad(kv[:, :-1, :, :width], (0, 0, 0, 0, 1, 0))
            ps = F.pad(sc[:, :-1, :, :width], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat([pk, kv[..., width:]], 2)
            sc = torch.cat([ps, sc[..., width:]], 2)
        e = (kv * torch.softmax(sc, 2)).sum(2)
        e = rmsnorm(e, self.w(cp + "norm.weight"), self.eps)
        return rope(e, cos[::ratio][:nw], sin[::ratio][:nw])

    def attention(self, x, layer, p, cs, want_kl):
        c = self.cfg
        B, N, _ = x.shape
        H, hd, win = c["num_attention_heads"], c["head_dim"], c["sliding_window"]
        ratio = c["compress_ratios"][layer]
        cos, sin = cs[1] if ratio else cs[0]
        a = p + "attn."
        qr = rmsnorm(x @ self.w(a + "wq_a.weight").T, self.w(a + "q_norm.weight"), self.eps)
        q = (qr @ self.w(a + "wq_b.weight").T).view(B, N, H, hd).float()
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + self.eps)
        q = rope(q, cos, sin)
        kv = rmsnorm(x @ self.w(a + "wkv.weight").T, self.w(a + "kv_norm.weight"), self.eps).float()
        kv = rope(kv, cos, sin)
        scale = hd ** -0.5
        # Window: query block i (win queries) against keys of blocks i-1 and i.
        C = win
        assert N % C == 0, "sequence length must be a multiple of sliding_window"
        nb = N // C
        kpad = F.pad(kv, (0, 0, C, 0))  # [B, N + C, hd]
        kwin = kpad.unfold(1, 2 * C, C).transpose(-1, -2)  # [B, nb, 2C, hd]
        qb = q.view(B, nb, C, H, hd)
        lw = torch.einsum("bnqhd,bnkd->bhnqk", qb, kwin) * scale  # [B, H, nb, C, 2C]
        qi = torch.arange(C, device=x.device)[:, None]
        ki = torch.arange(2 * C, device=x.device)[None, :]
        wmask = (ki - C <= qi) & (ki - C > qi - win)  # key at offset ki - C relative to block start
        first = torch.zeros(nb, 1, 1, dtype=torch.bool, device=x.device)
        first[0] = True
        wmask = wmask[None] & ~(first & (ki < C))  # block 0 has no previous block
        lw = lw.masked_fill(~wmask[None, None], float("-inf"))
        parts = [lw]
        kl = None
        if ratio:
            ent = self.compress(x, a + "compressor.", ratio, hd, cos, sin)  # [B, M, hd]
            M = ent.shape[1]
            t = torch.arange(N, device=x.device)
            visible = torch.arange(M, device=x.device)[None, :] < ((t + 1) // ratio)[:, None]  # [N, M]
            lc = torch.einsum("bnhd,bmd->bhnm", q, ent) * scale
            mask = visible[None]
            if ratio == 4:
                ih, idim = c["index_n_heads"], c["index_head_dim"]
                # In training the indexer learns from its KL loss alone (its inputs are detached).
                xi, qri = (x.detach(), qr.detach()) if self.training else (x, qr)
                ik = self.compress(xi, a + "indexer.compressor.", ratio, idim, cos, sin)
                iq = rope((qri @ self.w(a + "indexer.wq_b.weight").T).view(B, N, ih, idim).float(), cos, sin)
                iw = (xi @ self.w(a + "indexer.weights_proj.weight").T).float() * (idim ** -0.5 * ih ** -0.5)
                isc = torch.einsum("bnhd,bmd->bnhm", iq, ik).relu()
                isc = (isc * iw.unsqueeze(-1)).sum(2)  # [B, N, M]
                isc = isc.masked_fill(~visible[None], float("-inf"))
                k = min(c["index_topk"], M)
                if k < M:
                    # Stable sort: equal scores (relu makes zeros common) go to the lower index, as in
                    # the reference and DeepSeek's kernels.
                    top = isc.sort(dim=-1, descending=True, stable=True).indices[..., :k]
                    sel = torch.zeros(B, N, M, dtype=torch.bool, device=x.device).scatter_(-1, top, True)
                    mask = sel & visible[None]
                if want_kl:
                    # Queries with at least one visible entry; the others (the first `ratio` - 1) get an
                    # all-zero row, so no softmax sees only -inf, and do not count. Masks, not boolean
                    # indexing, keep the shapes static for torch.compile.
                    rows = visible.any(-1)  # [N]
                    vis = visible | ~rows[:, None]
                    with torch.no_grad():
                        tgt = torch.softmax(lc.float().masked_fill(~vis[None, None], float("-inf")), -1)
                        tgt = tgt.mean(1)  # [B, N, M], mean over heads
                    logp = torch.log_softmax(isc.float().masked_fill(~rows[None, :, None], 0.0), -1)
                    kl_rows = (tgt * (torch.log(tgt.clamp_min(1e-12)) - logp.clamp_min(-1e4))).sum(-1)  # [B, N]
                    kl_rows = kl_rows * rows.float()
                    kl = kl_rows.sum() / (rows.float().sum() * B)
                    if self.kl_focus is not None:
                        # The answers are where selection matters: their rows count again on their own.
                        focus = self.kl_focus.float() * rows.float()
                        kl = kl + (kl_rows * focus).sum() / focus.sum().clamp_min(1.0)
            lc = lc.masked_fill(~mask.unsqueeze(1), float("-inf"))
            parts.append(lc.view(B, H, nb, C, M))
        sink = self.w(a + "attn_sink").float().view(1, H, 1, 1, 1).expand(B, H, nb, C, 1)
        logits = torch.cat(parts + [sink], -1)
        prob = torch.softmax(logits.float(), -1)
        o = torch.einsum("bhnqk,bnkd->bnqhd", prob[..., :2 * C].to(kwin.dtype), kwin)
        if ratio:
            o = o + torch.einsum("bhnqm,bmd->bnqhd", prob[..., 2 * C:2 * C + M].to(ent.dtype), ent)
        o = o.reshape(B, N, H, hd)
        o = rope(o, cos, -sin)
        g_, r_ = c["o_groups"], c["o_lora_rank"]
        wo_a = self.w(a + "wo_a.weight").view(g_, r_, -1)
        mid = torch.einsum("bsgd,grd->bsgr", o.reshape(B, N, g_, -1).to(wo_a.dtype), wo_a)
        return mid.flatten(2) @ self.w(a + "wo_b.weight").T, kl

    # ---- model -------------------------------------------------------------------------------------------
    def block(self, h, layer, p, ids, cs, want_kl):
        x, post, comb = self.hc_pre(h, p, "attn")
        x = rmsnorm(x, self.w(p + "attn_norm.weight"), self.eps)
        o, kl = self.attention(x, layer, p, cs, want_kl)
        h = self.hc_post(o, h, post, comb)
        x, post, comb = self.hc_pre(h, p, "ffn")
        x = rmsnorm(x, self.w(p + "ffn_norm.weight"), self.eps)
        return self.hc_post(self.moe(x, p, ids, layer), h, post, comb), kl

    def rope_tables(self, N, device):
        pos = torch.arange(N, device=device, dtype=torch.float32)
        out = []
        for fr in (self.freqs_main, self.freqs_comp):
            ang = pos[:, None] * fr[None, :]
            out.append((torch.cos(ang), torch.sin(ang)))
        return out

    def logits(self, h, p):
        x = rmsnorm(self.hc_head(h, p), self.w(p + "norm.weight"), self.eps)
        return x @ self.w("head.weight").T

    def forward(self, ids, want_kl=False, mtp_next_ids=None):
        """ids [B, N] from position 0. Returns (logits [B, N, V], mtp logits or None, indexer KL terms)."""
        c = self.cfg
        B, N = ids.shape
        self._loads = []
        cs = self.rope_tables(N, ids.device)
        h = self.w("embed.weight")[ids].unsqueeze(2).expand(B, N, c["hc_mult"], -1)
        kls = []
        for l in range(c["num_hidden_layers"]):
            h, kl = self.block(h, l, f"layers.{l}.", ids, cs, want_kl)
            if kl is not None:
                kls.append(kl)
        logits = self.logits(h, "")
        mtp = None
        if mtp_next_ids is not None:
            mtp = self.mtp_logits(h, mtp_next_ids, cs, want_kl, kls)
        return logits, mtp, kls

    def mtp_logits(self, streams, next_ids, cs=None, want_kl=False, kls=None):
        """MTP block 0 on the main model's streams [B, N, hc, D] and the following ids [B, N]."""
        c = self.cfg
        p = "mtp.0."
        layer = c["num_hidden_layers"]
        if cs is None:
            cs = self.rope_tables(next_ids.shape[1], next_ids.device)
        e = rmsnorm(self.w("embed.weight")[next_ids], self.w(p + "enorm.weight"), self.eps)
        hn = rmsnorm(streams, self.w(p + "hnorm.weight"), self.eps)
        h = (e @ self.w(p + "e_proj.weight").T).unsqueeze(2) + hn @ self.w(p + "h_proj.weight").T
        h, kl = self.block(h, layer, p, next_ids, cs, want_kl)
        if kl is not None and kls is not None:
            kls.append(kl)
        return self.logits(h, p)

    @torch.no_grad()
    def update_route_bias(self, rate):
        """Auxiliary-loss-free load balancing: raise the bias of under-loaded experts, lower the others."""
        for layer, load in self._loads:
            b = getattr(self, f"route_bias_{layer}")
            b += rate * torch.sign(load.mean() - load)


# Linear weights the released checkpoints store as FP8 (tools/golden/v4_checkpoint.py FP8_SUFFIXES).
FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_b.weight",
                "indexer.wq_b.weight", "shared_experts.w1.weight", "shared_experts.w2.weight",
                "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
# Stored as F32 (tools/golden/v4_checkpoint.py F32_SUFFIXES); every other weight is stored as BF16.
F32_SUFFIXES = ("attn_sink", "_fn", "_base", "_scale", "ape", "gate.bias")
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e8m0(amax, qmax):
    return torch.pow(2.0, torch.ceil(torch.log2(amax.clamp_min(1e-30) / qmax)).clamp(-127, 127))


def fake_quant_fp8(w):
    """w [out, in] -> the values of its FP8 e4m3 encoding with one E8M0 scale per 128x128 tile (export's)."""
    w = w.float()
    out, inp = w.shape
    po, pi = (-out) % 128, (-inp) % 128
    t = F.pad(w, (0, pi, 0, po)).view((out + po) // 128, 128, (inp + pi) // 128, 128)
    s = _e8m0(t.detach().abs().amax((1, 3), keepdim=True), 448.0)
    q = (t / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return q.view(out + po, inp + pi)[:out, :inp]


def fake_quant_fp4(w):
    """w [..., in] -> the values of its MXFP4 encoding (e2m1, one E8M0 scale per 32 inputs; export's)."""
    w = w.float()
    b = w.view(*w.shape[:-1], w.shape[-1] // 32, 32)
    s = _e8m0(b.detach().abs().amax(-1, keepdim=True), 6.0)
    x = (b / s).clamp(-6.0, 6.0)
    grid = torch.tensor(FP4_GRID, device=w.device)
    # Nearest grid point by midpoints (ties go up here, to even codes in the exporter: measure-zero).
    mids = (grid[1:] + grid[:-1]) / 2
    mag = grid[torch.bucketize(x.abs(), mids)]
    return (torch.sign(x) * mag * s).view_as(w)


def _hc_head_init(params, p, lin, zeros, cfg):
    hc, D = cfg["hc_mult"], cfg["hidden_size"]
    lin(f"{p}hc_head_fn", hc, hc * D, 0.02 * (hc * D) ** -0.5)
    params[f"{p}hc_head_scale"] = torch.ones(1)
    zeros(f"{p}hc_head_base", hc)


def load_released_state(model, state):
    """Inverse of TinyV4.state_for_export: {released name: tensor} (float, dequantized) into the model."""
    c = model.cfg
    with torch.no_grad():
        for name in model.names:
            p = model.w(name)
            if ".experts.w" in name:
                prefix, wn = name.rsplit(".", 1)
                p.copy_(torch.stack([state[f"{prefix}.{e}.{wn}.weight"] for e in range(p.shape[0])]))
            else:
                p.copy_(state[name])
        for l in range(c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)):
            p = f"layers.{l}." if l < c["num_hidden_layers"] else f"mtp.{l - c['num_hidden_layers']}."
            if l < c["num_hash_layers"]:
                getattr(model, f"tid2eid_{l}").copy_(state[p + "ffn.gate.tid2eid"])
            else:
                getattr(model, f"route_bias_{l}").copy_(state[p + "ffn.gate.bias"])
