#!/usr/bin/env python3
"""Trains the tiny DeepSeek-V4 (models/tiny-v4) on generated tasks (tools/train/tasks.py).

One command, one seed (docs/TINY_MODEL.md):
    python3 tools/train/train.py --out OUTDIR --seed 0
writes OUTDIR/weights-*.safetensors (float32 master weights, in parts under 16 MB), OUTDIR/config.json,
OUTDIR/train_log.jsonl and OUTDIR/eval_torch.json (held-out accuracy of the PyTorch model).
tools/train/export.py turns the weights into the released checkpoint format.

Schedule: `--steps` optimizer steps; with `--time-budget S` (seconds) the schedule's progress is
max(step/steps, elapsed/S), so the whole schedule (warm-up, curriculum, cosine decay) fits into the
budget on slower hardware; `--time-budget 0` makes the run depend on the seed alone.
Curriculum: recall contexts grow from 256-512 tokens to 1k-8k tokens; every step also trains one batch of
short conversations (arithmetic, calculator tool calls, <｜title｜>).
Losses: next-token cross-entropy on what the assistant generates, 0.3 x the MTP block's (token after
next), 0.1 x the lightning indexer's KL to the main attention (indexer parameters only).
"""
import argparse
import functools
import json
import math
import os
import random
import sys
import multiprocessing as mp
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tasks  # noqa: E402
from v4_train_model import TinyV4  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TOKENIZER = os.path.join(ROOT, "models", "tiny-v4", "tokenizer.json")


def model_config(vocab_size):
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": vocab_size, "hidden_size": 256, "num_hidden_layers": 4, "num_nextn_predict_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64,
        "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 64, "sliding_window": 128,
        "compress_ratios": [0, 4, 128, 4, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 16384, "index_n_heads": 4, "index_head_dim": 128, "index_topk": 128,
        "moe_intermediate_size": 128, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "num_hash_layers": 1, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
        "norm_topk_prob": True, "topk_method": "noaux_tc", "swiglu_limit": 10.0, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "expert_dtype": "fp4",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "hidden_act": "silu",
    }


@functools.cache
def digit_ids():
    """[first, last] id of the digit tokens 0-9 (contiguous in the tokenizer; checked). Read on first use,
    not at import: the batch-making processes import this module too."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(TOKENIZER)
    ids = [tok.token_to_id(str(d)) for d in range(10)]
    assert ids == list(range(ids[0], ids[0] + 10)), "digit tokens are not contiguous"
    return ids[0], ids[-1]


class Encoder:
    """Pieces -> (ids, supervised mask). Pieces meet at added tokens, so encoding them one by one gives
    the ids of the whole text (checked on the first batches)."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(path)
        self.checked = 0

    def encode(self, convs):
        flat = [p for c in convs for p, _ in c]
        enc = self.tok.encode_batch(flat, add_special_tokens=False)
        out, i = [], 0
        for c in convs:
            ids, sup = [], []
            for _, s in c:
                e = enc[i].ids
                i += 1
                ids += e
                sup += [s] * len(e)
            if self.checked < 20:
                whole = self.tok.encode("".join(p for p, _ in c), add_special_tokens=False).ids
                assert whole == ids, "piece-wise tokenization differs from the whole text's"
                self.checked += 1
            out.append((ids, sup))
        return out


def pad_batch(rows, mult, pad_id=2):
    n = max(len(r[0]) for r in rows)
    n = (n + mult - 1) // mult * mult
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    sup = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (a, s) in enumerate(rows):
        ids[i, :len(a)] = torch.tensor(a)
        sup[i, :len(s)] = torch.tensor(s)
    return ids, sup


class Curriculum:
    """Recall context lengths, gated on measured accuracy rather than on the schedule alone.

    Stage 0 trains 256-768-token contexts (2-6 sliding windows, so only CSA/HCA entries reach most records,
    and at most 192 CSA entries, nearly all inside the indexer's top-k): the retrieval circuit forms here.
    Stage 1 goes up to 2k tokens (the indexer's top-k now selects), stage 2 up to 8k. A stage ends when the
    recall answers' token accuracy (moving average) passes its gate, or at the latest at the given fraction
    of the schedule. Later stages still draw short contexts (log-uniform lengths)."""

    GATES = ((0.92, 0.40), (0.90, 0.60))  # (digit accuracy gate, latest progress) to leave stage 0, stage 1
    MAX_LEN = (768, 2048, 8192)

    def __init__(self, stage=0, long_share=0.0):
        self.stage = stage
        self.long_share = long_share  # stage 2: share of steps drawn uniformly from the top half (4k-8k)
        self.acc = 0.0
        self.gates = self.GATES

    def update(self, acc, progress):
        self.acc = 0.7 * self.acc + 0.3 * acc  # updated every 10 steps
        if self.stage < 2:
            gate, latest = self.gates[self.stage]
            if self.acc >= gate or progress >= latest:
                self.stage += 1
                self.acc = 0.0
                return True
        return False

    def sample_len(self, rng):
        hi = self.MAX_LEN[self.stage]
        if self.stage == 0:
            return rng.randint(256, hi)
        if self.stage == 2 and self.long_share and rng.random() < self.long_share:
            return rng.randint(hi // 2, hi)
        return int(round(math.exp(rng.uniform(math.log(256), math.log(hi)))))


def make_batches(rng, enc, n, tokens_per_batch, window, short_rows=64, short_tokens=16384, questions=8,
                 dense=0.0, recall_format="joined"):
    """One step's data: a recall batch of about tokens_per_batch tokens (each context followed by
    `questions` questions; a share `dense` of the contexts hold as many records as the held-out items, one
    per 48 tokens, the rest fewer), and short conversations in micro-batches of at most short_tokens padded
    tokens (rows of similar length together). recall_format: one of tasks.RECALL_FORMATS."""
    b = max(1, tokens_per_batch // max(n, 256))
    long_convs = [tasks.conv_recall(rng, n, questions,
                                    tasks.eval_record_count(n) if dense and rng.random() < dense else None,
                                    recall_format)
                  for _ in range(b)]  # (no draw when an option is off: the earlier runs' data streams stay)
    short = []
    for _ in range(short_rows):
        r = rng.random()
        # Tool conversations carry a ~250-token system prompt, so they get few turns (the tool format is
        # learned early); arithmetic-only rows are short and many.
        short.append(tasks.conv_title(rng, recall_format) if r < 0.2 else
                     tasks.conv_arith(rng, rng.randint(6, 12)) if r < 0.6 else
                     tasks.conv_short(rng, rng.randint(2, 5), with_tools=True) if r < 0.8 else
                     tasks.conv_short(rng, rng.randint(4, 10), with_tools=False))
    rows = sorted(enc.encode(short), key=lambda r: len(r[0]))
    micro, cur = [], []
    for r in rows:
        padded = -(-len(r[0]) // window) * window
        if cur and (len(cur) + 1) * padded > short_tokens:
            micro.append(pad_batch(cur, window))
            cur = []
        cur.append(r)
    micro.append(pad_batch(cur, window))
    return pad_batch(enc.encode(long_convs), window), micro


def producer(q, stage, tokens_per_batch, seed, window, short_rows, short_tokens, max_len, recall_format,
             long_share, questions, dense):
    """Worker process: puts one step's batches after another into q, at the curriculum's current stage."""
    torch.set_num_threads(1)
    Curriculum.MAX_LEN = max_len
    enc = Encoder(TOKENIZER)
    rng = random.Random(seed)
    cur = Curriculum(long_share=long_share)
    while True:
        cur.stage = stage.value
        q.put(make_batches(rng, enc, cur.sample_len(rng), tokens_per_batch.value, window, short_rows,
                           short_tokens, questions, dense, recall_format))


def losses(model, ids, sup, want_kl):
    """model: the TinyV4 or its torch.compile wrapper."""
    nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], 2)], 1)
    base = getattr(model, "_orig_mod", model)
    # The indexer's KL counts the positions that predict an answer token twice (sup shifted by one).
    base.kl_focus = torch.cat([sup[:, 1:], torch.zeros_like(sup[:, :1])], 1) if want_kl else None
    logits, mtp, kls = model(ids, want_kl=want_kl, mtp_next_ids=nxt)
    base.kl_focus = None
    tgt1 = ids[:, 1:]
    m1 = sup[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][m1].float(), tgt1[m1])
    m2 = sup[:, 2:]
    ce2 = torch.nn.functional.cross_entropy(mtp[:, :-2][m2].float(), ids[:, 2:][m2])
    kl = torch.stack(kls).mean() if kls else torch.zeros((), device=ids.device)
    # Accuracy over the answers' digits (the recall values, the arithmetic results): the tokens that can
    # be wrong; keys, "=", EOS and tool-call syntax are nearly always right and would hide them.
    first, last = digit_ids()
    digit = m1 & (tgt1 >= first) & (tgt1 <= last)
    acc = (logits[:, :-1][digit].argmax(-1) == tgt1[digit]).float().mean()
    return ce, ce2, kl, acc


def backward_step(fwd, recall, micro, dev, amp):
    """Forward and backward of one step's batches (gradients accumulate in the parameters); returns the
    recall batch's (ce, mtp, indexer kl, accuracy) and the short conversations' (ce, mtp, accuracy)."""
    lids, lsup = recall
    with amp:
        ce_l, mtp_l, kl_l, acc_l = losses(fwd, lids.to(dev, non_blocking=True), lsup.to(dev, non_blocking=True), True)
    (ce_l + 0.3 * mtp_l + 0.1 * kl_l).backward()
    # Short conversations in micro-batches, each weighted by its share of the supervised tokens.
    n_sup = sum(int(s_[:, 1:].sum()) for _, s_ in micro)
    ce_s = mtp_s = acc_s = 0.0
    for sids, ssup in micro:
        share = int(ssup[:, 1:].sum()) / max(n_sup, 1)
        with amp:
            c_, m_, _, a_ = losses(fwd, sids.to(dev, non_blocking=True), ssup.to(dev, non_blocking=True), False)
        (share * (c_ + 0.3 * m_)).backward()
        ce_s, mtp_s, acc_s = ce_s + share * c_.detach(), mtp_s + share * m_.detach(), acc_s + share * a_
        del c_, m_
    return ce_l, mtp_l, kl_l, acc_l, ce_s, mtp_s, acc_s


def optimizer_step(model, opt):
    """After backward_step: clip, update, and move the score-routed layers' routing bias toward balance."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.update_route_bias(1e-3)


def save_weights(model, out_dir, cfg):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_for_export().items()}
    parts, cur, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and size + nbytes > 14 * 2 ** 20:
            parts.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += nbytes
    parts.append(cur)
    for old in os.listdir(out_dir):
        if old.startswith("weights-") and old.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, old))
    for i, p in enumerate(parts):
        save_file(p, os.path.join(out_dir, f"weights-{i}.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def save_state(out_dir, cur, step, progress):
    """Where the run stands, for a run that continues it (--init reads the curriculum stage from here)."""
    with open(os.path.join(out_dir, "state.json"), "w") as f:
        json.dump({"stage": cur.stage, "recall_acc_avg": round(cur.acc, 4), "steps": step,
                   "progress": round(progress, 4)}, f)


def load_init(model, d):
    """Starts from an earlier run: its OUTDIR (float32 weights-*.safetensors) or an exported checkpoint
    directory (model.safetensors, dequantized)."""
    from safetensors.torch import load_file
    from v4_train_model import load_released_state
    import glob
    state = {}
    for p in sorted(glob.glob(os.path.join(d, "weights-*.safetensors"))):
        state.update(load_file(p))
    if not state:
        sys.path.insert(0, os.path.join(HERE, "..", "golden"))
        from model_loader import dequantized
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in dequantized(load_file(os.path.join(d, "model.safetensors"))).items()}
    load_released_state(model, state)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; 0 = step-based schedule only")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    ap.add_argument("--tokens-per-batch", type=int, default=16384, help="recall tokens per step")
    ap.add_argument("--short-rows", type=int, default=96, help="short conversations per step")
    ap.add_argument("--short-tokens", type=int, default=16384, help="padded tokens per short micro-batch")
    ap.add_argument("--qat-from", type=float, default=0.8,
                    help="schedule progress from which weights are fake-quantized as exported (1 = never)")
    ap.add_argument("--init", help="OUTDIR of an earlier run to start from (optimizer state starts fresh)")
    ap.add_argument("--stage", type=int, default=None,
                    help="curriculum stage to start in (0, 1, 2); default: where the --init run ended (its "
                         "state.json), else 0")
    ap.add_argument("--stage-deadlines", default="0.4,0.6",
                    help="schedule progress by which stages 0 and 1 end even if their accuracy gate did not pass "
                         "(1,1 = only the gates move the curriculum on)")
    ap.add_argument("--progress-range", default="0,1",
                    help="the part of the whole schedule (learning rate, QAT start, stage deadlines) this run covers, "
                         "for a schedule split over several runs that continue each other with --init")
    ap.add_argument("--long-share", type=float, default=0.0,
                    help="in stage 2, the share of steps whose recall context is drawn uniformly from 4k-8k "
                         "tokens (the rest log-uniformly from 256-8k)")
    ap.add_argument("--questions", type=int, default=8,
                    help="questions after each recall context (more answers per long forward pass)")
    ap.add_argument("--dense-records", type=float, default=0.0,
                    help="share of recall contexts with the held-out items' record density (one per 48 tokens); "
                         "the others draw 4 to that many records")
    ap.add_argument("--workers", type=int, default=2, help="batch-making processes")
    ap.add_argument("--save-every", type=float, default=120, help="seconds between weight saves (0 = at the end)")
    ap.add_argument("--recall-format", default="joined", choices=tasks.RECALL_FORMATS,
                    help="recall records and answers (tasks.RECALL_FORMATS): joined is the task; the others replay "
                         "the earlier runs the shipped checkpoint came from")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: small width, short contexts")
    ap.add_argument("--eval-per-cell", type=int, default=50)
    ap.add_argument("--eval-budget", type=float, default=0,
                    help="seconds for the held-out evaluation after training (0 = no limit); items left when it "
                         "runs out are skipped and the table counts the ones evaluated")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    enc = Encoder(TOKENIZER)
    cfg = model_config(enc.tok.get_vocab_size())
    if args.stage is None:
        state_file = os.path.join(args.init or "", "state.json")
        args.stage = json.load(open(state_file))["stage"] if args.init and os.path.exists(state_file) else 0
    cur = Curriculum(args.stage)
    d0, d1 = (float(x) for x in args.stage_deadlines.split(","))
    cur.gates = ((Curriculum.GATES[0][0], d0), (Curriculum.GATES[1][0], d1))
    if args.tiny:
        cfg.update(hidden_size=128, q_lora_rank=64, o_lora_rank=32, n_routed_experts=4, sliding_window=32,
                   index_topk=16, compress_ratios=[0, 4, 32, 4, 0])
        Curriculum.MAX_LEN = (256, 256, 256)
    model = TinyV4(cfg, seed=args.seed).to(dev)
    if args.init:
        load_init(model, args.init)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M on {dev}", flush=True)
    indexer = [p for n, p in model.params.items() if "__indexer__" in n]
    others = [p for n, p in model.params.items() if "__indexer__" not in n]
    opt = torch.optim.AdamW([{"params": others}, {"params": indexer}], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    log = open(os.path.join(args.out, "train_log.jsonl"), "w")
    # Batches are made by worker processes (generation and tokenization are Python and would hold the GIL
    # against the training loop); the curriculum's stage reaches them through a shared value.
    ctx = mp.get_context("spawn")
    stage = ctx.Value("i", cur.stage)
    tokens = ctx.Value("i", args.tokens_per_batch)
    q = ctx.Queue(maxsize=8)
    workers = [ctx.Process(target=producer, daemon=True, args=(
        q, stage, tokens, args.seed * 1000 + 1 + i, cfg["sliding_window"], args.short_rows,
        args.short_tokens, Curriculum.MAX_LEN, args.recall_format, args.long_share, args.questions,
        args.dense_records))
        for i in range(args.workers)]
    for w_ in workers:
        w_.start()
    # torch.compile is not used: with dynamic shapes its compilation of this model did not finish in 400 s
    # on the H100 (tools/train/bench_step.py --modes compile; tools/train/runs/v3_bench_step_h100.txt).
    fwd = model
    p0, p1 = (float(x) for x in args.progress_range.split(","))
    t0 = last_save = time.time()
    step, progress = 0, p0

    def save():
        save_weights(model, args.out, cfg)
        save_state(args.out, cur, step, progress)

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    while True:
        el = time.time() - t0
        local = max(step / args.steps, el / args.time_budget if args.time_budget else 0.0)
        if local >= 1.0:
            break
        progress = p0 + (p1 - p0) * local
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        if not model.qat and progress >= args.qat_from:
            model.qat = True
            print(f"step {step}: quantization-aware from here (weights as exported)", flush=True)
        (lids, lsup), micro = q.get()
        if args.save_every and time.time() - last_save >= args.save_every:
            save()  # a run killed at a wall-clock limit keeps its progress
            last_save = time.time()
        model.train()
        opt.zero_grad(set_to_none=True)
        try:
            ce_l, mtp_l, kl_l, acc_l, ce_s, mtp_s, acc_s = backward_step(fwd, (lids, lsup), micro, dev, amp)
        except torch.OutOfMemoryError:
            tokens.value //= 2
            print(f"out of memory at {tuple(lids.shape)}: tokens per batch now {tokens.value}", flush=True)
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if tokens.value < 1024:
                raise SystemExit("out of memory even with 1k recall tokens per step")
            continue
        optimizer_step(model, opt)
        if step % 10 == 0:
            a = acc_l.item()
            if cur.update(a, progress):
                stage.value = cur.stage
                print(f"step {step}: curriculum stage {cur.stage} (recall contexts up to "
                      f"{cur.MAX_LEN[cur.stage]} tokens)", flush=True)
        if step % 25 == 0:
            rec = {"step": step, "t": round(time.time() - t0, 1), "progress": round(progress, 3), "lr": lr,
                   "stage": cur.stage, "recall_len": lids.shape[1], "ce_recall": ce_l.item(),
                   "acc_recall": acc_l.item(), "acc_recall_avg": round(cur.acc, 4), "ce_short": ce_s.item(),
                   "acc_short": acc_s.item(), "mtp": (mtp_l + mtp_s).item() / 2, "index_kl": kl_l.item(),
                   "qat": model.qat}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        step += 1
    progress = p1 if local >= 1.0 else progress
    print(f"trained {step} steps in {time.time() - t0:.0f} s", flush=True)
    model.eval()
    # Export what was trained: with QAT on, the weights saved are the master weights and the exporter
    # quantizes them to exactly the values the forward used.
    save()
    if args.eval_per_cell:
        import eval_torch
        res = eval_torch.evaluate(model, enc.tok, dev, args.eval_per_cell,
                                  lengths=(256,) if args.tiny else (1024, 2048, 4096, 8192),
                                  deadline=time.time() + args.eval_budget if args.eval_budget else None)
        with open(os.path.join(args.out, "eval_torch.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(eval_torch.table(res), flush=True)


if __name__ == "__main__":
    main()
