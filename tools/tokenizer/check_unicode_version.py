#!/usr/bin/env python3
"""Prints which Unicode version HF tokenizers' regex engine uses, by probing code points that each
Unicode version newly assigned as symbols (a symbol splits "aXb" into three pieces, an unassigned code
point joins the following letter). Usage: .venv/bin/python tools/tokenizer/check_unicode_version.py TOKENIZER_JSON
"""
import sys

from tokenizers import Tokenizer

PROBES = [("15.0", 0x1F6DC), ("15.1", 0x31EF), ("16.0", 0x1CC00), ("17.0", 0x1FAEA)]

tok = Tokenizer.from_file(sys.argv[1])
known = "<15.0"
for version, cp in PROBES:
    pieces = tok.pre_tokenizer.pre_tokenize_str("a" + chr(cp) + "b")
    if len(pieces) == 3:
        known = version
print("tokenizers regex engine knows Unicode", known)
