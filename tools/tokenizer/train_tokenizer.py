#!/usr/bin/env python3
"""Trains the small test tokenizer in DeepSeek-V4's tokenizer.json format with HF tokenizers.

Same normalizer (empty Sequence), pre-tokenizer (three Isolated Splits + ByteLevel without regex),
BPE model and ByteLevel decoder as DeepSeek's released tokenizer.json; merges are written as
"left right" strings like DeepSeek's file. The training text is the files given on the command line
(deterministic order); docs/TOKENIZER.md lists the files used for the committed one.

Usage: .venv/bin/python tools/tokenizer/train_tokenizer.py --vocab-size 4096 \
           --out tests/model/testdata/tokenizer/tokenizer.json FILE...
"""
import argparse
import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import v4_tokens  # noqa: E402

SPLITS = [
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]


def build_empty():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab-size", type=int, default=4096, help="total size including added tokens")
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    texts = []
    for path in sorted(args.files):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())

    tok = build_empty()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size - len(v4_tokens.ADDED_AFTER_VOCAB),
        special_tokens=[v4_tokens.BOS, v4_tokens.EOS, v4_tokens.PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    for content, special in v4_tokens.ADDED_AFTER_VOCAB:
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])

    data = json.loads(tok.to_str())
    # DeepSeek's file writes merges as "left right" strings (older tokenizers format).
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["post_processor"] = None
    text = json.dumps(data, ensure_ascii=False, indent=1)
    # The file must load back in HF tokenizers unchanged.
    Tokenizer.from_str(text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}: {len(data['model']['vocab'])} vocab + {len(data['added_tokens'])} added tokens, "
          f"{len(data['model']['merges'])} merges, {len(text)} bytes")


if __name__ == "__main__":
    main()
