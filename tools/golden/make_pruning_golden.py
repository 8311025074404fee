"""Golden for real top-k pruning (index_topk 4) on the tiny V4 written by make_goldens.py.

Top-k on near-equal indexer scores is implementation-defined (ReLU makes exact zeros common with random
weights), so the golden keeps only the positions before the first query, in any CSA layer, whose k-th and
(k+1)-th indexer scores differ by less than --margin (relative to the row's largest score). Logits there do
not depend on tie-breaking, so any correct implementation must reproduce them. The prompt is the one of
--seeds candidates with the longest tie-free prefix.

    .venv/bin/python tools/golden/make_pruning_golden.py --dir tests/model/testdata/tiny_v4
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl

import make_goldens
import v4_checkpoint

TOPK = 4


class MarginCheck:
    def __init__(self, margin):
        self.margin = margin
        self.worst = float("inf")
        self.first_tie = 1 << 30

    def hook(self, module, inputs, scores):  # scorer output [B, S, T]
        s = scores[0].float()
        seq, t = s.shape
        pos = torch.arange(seq)  # full forward from position 0
        visible = (pos + 1) // 4
        for i in range(seq):
            n = int(visible[i])
            if n <= TOPK:
                continue
            row = s[i, :n].sort(descending=True).values
            gap = float(row[TOPK - 1] - row[TOPK]) / max(float(row.abs().max()), 1e-30)
            self.worst = min(self.worst, gap)
            if gap <= self.margin:
                self.first_tie = min(self.first_tie, i)


def load_model(ckpt_dir):
    model = mdl.DeepseekV4ForCausalLM(make_goldens.tiny_config(index_topk=TOPK)).float().eval()
    model.config._attn_implementation = "eager"
    tensors = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    # Rebuild the HF state from the released tensors by round-tripping names through the same mapping.
    _, back = v4_checkpoint.released_tensors(model, quantize=False)  # only for the name list
    sd = model.state_dict()
    inter = model.config.moe_intermediate_size
    from model_loader import dequantized  # noqa: E402  (tools/golden/model_loader.py)
    deq = dequantized(tensors)
    for hf_name in sd:
        if hf_name.endswith("mlp.experts.gate_up_proj") or hf_name.endswith("mlp.experts.down_proj"):
            prefix = v4_checkpoint.hf_to_released(hf_name.rsplit(".", 1)[0])
            for e in range(sd[hf_name].shape[0]):
                if hf_name.endswith("gate_up_proj"):
                    sd[hf_name][e, :inter] = deq[f"{prefix}.{e}.w1.weight"]
                    sd[hf_name][e, inter:] = deq[f"{prefix}.{e}.w3.weight"]
                else:
                    sd[hf_name][e] = deq[f"{prefix}.{e}.w2.weight"]
        else:
            sd[hf_name].copy_(deq[v4_checkpoint.hf_to_released(hf_name)])
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--margin", type=float, default=2e-4)
    ap.add_argument("--len", type=int, default=160)
    ap.add_argument("--seeds", type=int, default=40)
    args = ap.parse_args()
    model = load_model(args.dir)
    best = None
    for seed in range(args.seeds):
        check = MarginCheck(args.margin)
        hooks = [m.register_forward_hook(check.hook) for m in model.modules()
                 if isinstance(m, mdl.DeepseekV4IndexerScorer)]
        g = torch.Generator().manual_seed(1000 + seed)
        ids = torch.randint(2, 512, (args.len,), generator=g).tolist()
        logits = make_goldens.full_logits(model, ids)
        for h in hooks:
            h.remove()
        print(f"seed {seed}: first query with a near-tie at the top-k boundary: {check.first_tie}")
        if best is None or check.first_tie > best[0]:
            best = (check.first_tie, ids, logits)
    first_tie, ids, logits = best
    # Logits before the first near-tie do not depend on tie-breaking; queries from position 4k+3 on see more
    # than k entries, so these positions exercise real pruning.
    positions = [p for p in range(0, min(first_tie, len(ids))) if p < 16 or p % 3 == 0 or p == first_tie - 1]
    fx = {"prompt": ids, "positions": positions, "index_topk": TOPK, "first_near_tie": first_tie,
          "logits": [[round(float(v), 7) for v in logits[p]] for p in positions]}
    with open(os.path.join(args.dir, "golden_topk4.json"), "w") as f:
        json.dump({"reference": "transformers DeepseekV4ForCausalLM, FP32, no cache, index_topk 4; positions "
                                "before the first near-tie of indexer scores at the top-k boundary",
                   "fixtures": {"pruned": fx}}, f)



if __name__ == "__main__":
    main()
