"""DeepSeek-V4 token layout shared by the tokenizer tools.

BOS/EOS/pad sit at ids 0/1/2 as in DeepSeek's released tokenizer.json (V3 and V4); the chat-control
and quick-instruction tokens follow the trained vocabulary, as V3's do (its are at 128000+). Spellings
come from encoding/encoding_dsv4.py and its README (fullwidth bars U+FF5C, U+2581 for spaces).
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"

# (content, special). Reasoning and DSML markers are special=False, so HF's and our
# decode(skip_special_tokens=True) keep them in the text the reasoning/tool-call parser reads.
ADDED_AFTER_VOCAB = [
    ("<｜User｜>", True),
    ("<｜Assistant｜>", True),
    ("<｜latest_reminder｜>", True),
    ("<think>", False),
    ("</think>", False),
    ("｜DSML｜", False),
    ("<｜action｜>", True),
    ("<｜query｜>", True),
    ("<｜authority｜>", True),
    ("<｜domain｜>", True),
    ("<｜title｜>", True),
    ("<｜read_url｜>", True),
    ("<｜extracted_url｜>", True),
    ("<｜fim▁hole｜>", True),
    ("<｜fim▁begin｜>", True),
    ("<｜fim▁end｜>", True),
]
