"""Generated tasks for the tiny V4 model, rendered in V4's chat format (docs/TOKENIZER.md).

Every task is a list of (text, supervised) pieces: the prompt pieces are rendered as the router's
ChatEncoder renders an OpenAI request (the templates follow tests/model/testdata/chat/chat_cases.jsonl:
plain_chat, multi_turn_chat, tools_chat, tools_empty_system, task_title; on the 280 held-out items of
tools/eval the router's prompt_tokens equal the token counts of render_messages() in every cell), the
supervised pieces are what the model must generate (answer + EOS).

Tasks
  recall      a haystack of filler words with code records KEYVALUE ("takux417": key takux, value 417);
              "What is the code of KEY?" -> "KEY417", the record as the context wrote it. Keys are distinctive
              words that are single tokens; values are 3 digits, a token each. With a sliding window of 128
              tokens, a record further back is reachable only through CSA/HCA entries. The answer repeats the
              key, so each digit follows in the answer exactly the token it follows in the record: one
              previous-token match (an induction head) finds it. With the bare value as the answer, or a
              separator between key and value ("takux=417"), the first digit must be matched on a key two or
              three tokens back; trained that way (v3 runs 1 and 2), the model got it right 36% of the time
              against 86-96% for the digits after it (docs/TINY_MODEL.md).
  arith       "What is A + B?" / "What is A - B?" with 1-4 digit operands -> the result.
  tool        with a `calculator` tool defined: "Use the calculator to compute A * B." -> a DSML tool call
              with expression "A * B"; then the tool result -> "The result is R."
  title       a finished conversation followed by <｜title｜> -> a short title.
"""
import json
import random

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_END = "</think>"
TITLE = "<｜title｜>"

_CONS = "bdfghklmnprstvz"
_VOW = "aeiou"


def _make_keys(n, seed=1234):
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(2)) + rng.choice("nrsx")
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# Filler words: ordinary English words, never used as keys.
FILLER = ("the of and a to in is was for on that with as by at from it his an were are which this be or has "
          "had not but one their its they after two new first been also all other more who time year some "
          "city state river house water light north south east west small large black white green early "
          "late long short music field party stone paper table world color power game team road line").split()
KEYS = _make_keys(160)

CALC_TOOL = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}

TOOLS_SYSTEM_TEMPLATE = (
    "\n\n## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools "
    "by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke "
    "name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE"
    "</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all "
    "other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`."
    "\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> "
    "with tool calls or final response.\n\n### Available Tool Schemas\n\n{schemas}\n\nYou MUST strictly follow "
    "the above defined tool name and parameter schemas to invoke tool calls.\n")


def tools_system(system_content=""):
    schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in [CALC_TOOL])
    return system_content + TOOLS_SYSTEM_TEMPLATE.replace("{schemas}", schemas)


def dsml_call(expression):
    return ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"calculator\">\n<｜DSML｜parameter name=\"expression\" "
            f"string=\"true\">{expression}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


# ---- single items: (question text, answer text, title text, meta) ------------------------------------------
def recall_context(rng, n_tokens_target, n_records, tokens_per_word=1.19, fmt="joined"):
    """Filler text of about n_tokens_target tokens with n_records 'KEYVALUE' records at random places."""
    keys = rng.sample(KEYS, n_records)
    values = [f"{rng.randrange(1000):03d}" for _ in keys]
    n_words = max(n_records * 2, int(n_tokens_target / tokens_per_word))
    words = [rng.choice(FILLER) for _ in range(n_words)]
    slots = sorted(rng.sample(range(n_words), n_records))
    for i, (k, v) in zip(slots, zip(keys, values)):
        words[i] = recall_record(k, v, fmt)
    # A full stop every few words keeps lines short (and gives the text some structure).
    text = []
    for i, w in enumerate(words):
        text.append(w)
        if rng.random() < 0.12:
            text[-1] += "."
    return "Remember the codes. " + " ".join(text), list(zip(keys, values))


def recall_question(key):
    return f"\nWhat is the code of {key}?"


# How records and answers are written (the `fmt` argument below). "joined" is the task (the shipped model's
# format); the others are the earlier formats, kept so that train_tiny_v4.sh can replay the runs the
# checkpoint came from: "bare" (v1, v2: record "takux=417", answer "417") and "sep" (one run: record
# "takux=417", answer "takux=417").
RECALL_FORMATS = ("joined", "sep", "bare")


def recall_record(key, value, fmt="joined"):
    return f"{key}{value}" if fmt == "joined" else f"{key}={value}"


def recall_answer(key, value, fmt="joined"):
    """What the model generates: " KEYVALUE" (the leading space makes " KEY" the record's token; scoring
    strips it)."""
    if fmt == "bare":
        return value
    return " " + recall_record(key, value, fmt)


def arith_item(rng, digits=None):
    da = digits or rng.randint(1, 4)
    db = rng.randint(1, 4) if digits is None else digits
    a, b = rng.randrange(10 ** (da - 1) if da > 1 else 0, 10 ** da), rng.randrange(10 ** (db - 1) if db > 1 else 0, 10 ** db)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b), f"Sum of {a} and {b}", {"op": "+", "a": a, "b": b}
    if a < b:
        a, b = b, a
    return f"What is {a} - {b}?", str(a - b), f"Difference of {a} and {b}", {"op": "-", "a": a, "b": b}


def tool_item(rng):
    a, b = rng.randrange(10, 10000), rng.randrange(2, 1000)
    expr = f"{a} * {b}"
    return f"Use the calculator to compute {expr}.", expr, str(a * b), f"Product of {a} and {b}"


# ---- conversations as pieces [(text, supervised)] -----------------------------------------------------------
def conv_recall(rng, n_tokens, n_questions, n_records=None, fmt="joined"):
    n_records = n_records or max(n_questions, min(len(KEYS), rng.randint(4, max(5, n_tokens // 48))))
    ctx, recs = recall_context(rng, n_tokens, n_records, fmt=fmt)
    asked = rng.sample(recs, min(n_questions, len(recs)))
    pieces = [(BOS, False)]
    for i, (k, v) in enumerate(asked):
        q = (ctx if i == 0 else "") + recall_question(k).lstrip("\n" if i else "")
        pieces += [(USER + q + ASSISTANT + THINK_END, False), (recall_answer(k, v, fmt) + EOS, True)]
    return pieces


def conv_short(rng, n_turns, with_tools):
    """Arithmetic and calculator turns (the latter only with the tool defined), as one conversation."""
    pieces = [(BOS + (tools_system() if with_tools else ""), False)]
    for _ in range(n_turns):
        if with_tools and rng.random() < 0.5:
            q, expr, result, _ = tool_item(rng)
            pieces += [(USER + q + ASSISTANT + THINK_END, False), (dsml_call(expr) + EOS, True),
                       (USER + f"<tool_result>{result}</tool_result>" + ASSISTANT + THINK_END, False),
                       (f"The result is {result}." + EOS, True)]
        else:
            q, a, _, _ = arith_item(rng)
            pieces += [(USER + q + ASSISTANT + THINK_END, False), (a + EOS, True)]
    return pieces


def conv_arith(rng, n_turns):
    """Arithmetic turns only, without a system prompt (as the held-out arithmetic items are asked)."""
    pieces = [(BOS, False)]
    for _ in range(n_turns):
        q, a, _, _ = arith_item(rng)
        pieces += [(USER + q + ASSISTANT + THINK_END, False), (a + EOS, True)]
    return pieces


def conv_title(rng, fmt="joined"):
    """One finished exchange then <｜title｜> (DeepSeek's quick instruction) -> its title."""
    kind = rng.random()
    if kind < 0.4:
        q, a, title, _ = arith_item(rng)
        body = USER + q + ASSISTANT + THINK_END + a + EOS
    elif kind < 0.7:
        q, expr, result, title = tool_item(rng)
        body = USER + q + ASSISTANT + THINK_END + f"The result is {result}." + EOS
    else:
        ctx, recs = recall_context(rng, rng.randint(30, 120), rng.randint(2, 4), fmt=fmt)
        k, v = rng.choice(recs)
        title = f"Code of {k}"
        body = USER + ctx + recall_question(k) + ASSISTANT + THINK_END + recall_answer(k, v, fmt) + EOS
    return [(BOS + body + TITLE, False), (title + EOS, True)]


# ---- held-out evaluation items (what tools/eval sends through the API) -----------------------------------
def eval_record_count(n_tokens):
    """Records in a held-out context of n_tokens tokens: one per 48 tokens, at most one per key."""
    return max(4, min(len(KEYS), n_tokens // 48))


def eval_items(seed, n_per_cell, recall_lengths=(1024, 2048, 4096, 8192)):
    """Held-out items: dicts with task, length, messages or prompt, and the expected answer."""
    rng = random.Random(seed)
    items = []
    for length in recall_lengths:
        for _ in range(n_per_cell):
            # The context length is the prompt's length in tokens (approximately: one word is one token).
            ctx, recs = recall_context(rng, length - 20, eval_record_count(length))
            k, v = rng.choice(recs)
            items.append({"task": "recall", "length": length,
                          "messages": [{"role": "user", "content": ctx + recall_question(k)}],
                          "expect": recall_answer(k, v).strip()})
    for _ in range(n_per_cell):
        q, a, _, meta = arith_item(rng)
        items.append({"task": "arith", "length": 0, "messages": [{"role": "user", "content": q}], "expect": a})
    for _ in range(n_per_cell):
        q, expr, result, _ = tool_item(rng)
        sys_msg = {"role": "system", "content": ""}
        items.append({"task": "tool_call", "length": 0, "messages": [{"role": "user", "content": q}],
                      "tools": [CALC_TOOL], "expect": {"name": "calculator", "arguments": {"expression": expr}}})
        items.append({"task": "tool_answer", "length": 0, "tools": [CALC_TOOL], "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {
                "name": "calculator", "arguments": json.dumps({"expression": expr})}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": result}], "expect": f"The result is {result}."})
        del sys_msg
    for _ in range(n_per_cell):
        pieces = conv_title(rng)
        items.append({"task": "title", "length": 0, "prompt": pieces[0][0].removeprefix(BOS),
                      "messages": title_messages(pieces[0][0]), "expect": pieces[1][0].removesuffix(EOS)})
    return items


def title_messages(prompt):
    """The chat messages whose rendering plus <｜title｜> is `prompt` (a conv_title prompt): the router's
    quick instruction (v4serve.quick_instruction = "title") appends the task token to exactly this."""
    body = prompt.removeprefix(BOS).removesuffix(TITLE).removesuffix(EOS)
    user, answer = body.removeprefix(USER).split(ASSISTANT + THINK_END, 1)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def render_messages(messages, tools=None):
    """The prompt text the router renders for these messages (chat mode), for the subset eval_items uses."""
    out = BOS + (tools_system() if tools else "")
    pending_results = []
    for m in messages:
        if m["role"] == "user":
            out += USER + m["content"]
        elif m["role"] == "tool":
            pending_results.append(m["content"])
            continue
        elif m["role"] == "assistant":
            out += ASSISTANT + THINK_END + m.get("content", "")
            for tc in m.get("tool_calls", []):
                out += dsml_call(json.loads(tc["function"]["arguments"])["expression"])
            out += EOS
        if pending_results and m["role"] != "tool":
            raise ValueError("tool results must come last in these items")
    if pending_results:
        out += USER + "\n\n".join(f"<tool_result>{r}</tool_result>" for r in pending_results)
    return out + ASSISTANT + THINK_END


# ---- scoring (shared by the PyTorch evaluation and tools/eval) -------------------------------------------
_DSML_RE = None


def parse_dsml_calls(text):
    """Tool calls in a completion's text (the subset the calculator uses): [{"name", "arguments"}]."""
    import re
    global _DSML_RE
    if _DSML_RE is None:
        _DSML_RE = (re.compile(r'<｜DSML｜invoke name="([^"]*)">(.*?)</｜DSML｜invoke>', re.S),
                    re.compile(r'<｜DSML｜parameter name="([^"]*)" string="(true|false)">(.*?)</｜DSML｜parameter>',
                               re.S))
    calls = []
    for name, body in _DSML_RE[0].findall(text):
        args = {}
        for pn, is_str, val in _DSML_RE[1].findall(body):
            args[pn] = val if is_str == "true" else json.loads(val)
        calls.append({"name": name, "arguments": args})
    return calls


def score(item, content, tool_calls):
    """True when the model's answer is right. content: text; tool_calls: [{"name", "arguments": dict}]."""
    if item["task"] == "tool_call":
        return len(tool_calls) == 1 and tool_calls[0] == item["expect"]
    return content.strip() == item["expect"]
