#!/usr/bin/env python3
"""Builds the tiny model's tokenizer.json (DeepSeek-V4 layout, loads in model/tokenizer.cc).

BPE trained with HF tokenizers on generated task text (tools/train/tasks.py) through the same builder as
the test tokenizer (tools/tokenizer/train_tokenizer.py: V4's pre-tokenizer, byte-level BPE, ids 0/1/2 =
BOS/EOS/pad, V4's added tokens after the vocabulary). Digits are removed from the training text, so no
merge ever joins two digits: every digit is its own token, which is what makes multi-digit arithmetic
learnable by a small model. Checks that every recall key and filler word is a single token.

Usage: python tools/train/build_tokenizer.py --out models/tiny-v4/tokenizer.json
"""
import argparse
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tokenizer"))
from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers  # noqa: E402

import tasks  # noqa: E402
import train_tokenizer  # noqa: E402
import v4_tokens  # noqa: E402


def corpus(seed=0, n=3000):
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        r = i % 3
        if r == 0:
            pieces = tasks.conv_recall(rng, 300, 3)
        elif r == 1:
            pieces = tasks.conv_short(rng, 4, with_tools=rng.random() < 0.5)
        else:
            pieces = tasks.conv_title(rng)
        texts.append(re.sub(r"[0-9]", " ", "".join(p for p, _ in pieces)))
    # Every key and filler word often enough, with and without a leading space.
    texts.append(" ".join(tasks.KEYS * 20) + " " + " ".join(tasks.FILLER * 20))
    return texts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = train_tokenizer.build_empty()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size - len(v4_tokens.ADDED_AFTER_VOCAB),
        special_tokens=[v4_tokens.BOS, v4_tokens.EOS, v4_tokens.PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    for content, special in v4_tokens.ADDED_AFTER_VOCAB:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        tok.add_special_tokens([added]) if special else tok.add_tokens([added])
    data = json.loads(tok.to_str())
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["post_processor"] = None
    text = json.dumps(data, ensure_ascii=False, indent=1)
    t = Tokenizer.from_str(text)
    bad = [w for w in tasks.KEYS + tasks.FILLER if len(t.encode(" " + w).ids) != 1]
    digits = [d for d in "0123456789" if len(t.encode(d).ids) != 1]
    if bad or digits or len(t.encode("123").ids) != 3:
        raise SystemExit(f"not single tokens: {bad[:20]} digits {digits}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}: {t.get_vocab_size()} ids, {len(data['model']['merges'])} merges")


if __name__ == "__main__":
    main()
