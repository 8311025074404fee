"""Conversations and completions the chat fixtures are generated from (see gen_chat_fixtures.py).

Messages are in the OpenAI shape the router receives, with DeepSeek's extensions (reasoning_content,
task, wo_eos, latest_reminder/developer roles); tools sit on the system or developer message, where
encode_messages() expects them.
"""

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}

WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. 北京"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the web. Use \"quotes\" for exact phrases.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "default": 5},
            "filters": {"type": "object", "properties": {"lang": {"type": "string"}}}},
            "required": ["query"]}}},
]


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_TURNS = [
    {"role": "user", "content": "What's the weather in Beijing and Tokyo? Also search for news."},
    {"role": "assistant", "reasoning_content": "I need two weather lookups and one search.", "content": "",
     "tool_calls": [
         call("call_1", "get_weather", "{\"city\": \"Beijing\", \"unit\": \"celsius\"}"),
         call("call_2", "get_weather", "{\"city\": \"東京\"}"),
         call("call_3", "search", "{\"query\": \"weather news\", \"top_k\": 3, \"filters\": {\"lang\": \"en\"}}"),
     ]},
    # Results arrive out of order; the encoding sorts them by call order.
    {"role": "tool", "tool_call_id": "call_3", "content": "[{\"title\": \"Storm warning\"}]"},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 22, \"sky\": \"clear\"}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 18, \"sky\": \"rain\"}"},
    {"role": "assistant", "reasoning_content": "Summarize all three.",
     "content": "Beijing: 22°C and clear. Tokyo: 18°C with rain. News: a storm warning."},
    {"role": "user", "content": "Thanks! And Shanghai?"},
]

CONVERSATIONS = [
    {"name": "plain_chat", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "Hello! What is 2+2?"}]},
    {"name": "plain_thinking", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Hello! What is 2+2?"}]},
    {"name": "no_system_thinking", "thinking_mode": "thinking",
     "messages": [{"role": "user", "content": "用中文介绍一下你自己 🙂"}]},
    {"name": "empty_system_content_null", "thinking_mode": "chat",
     "messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]},
    {"name": "multi_turn_chat", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Tell me a joke.\nMake it short."}]},
    {"name": "multi_turn_thinking_drops_old_reasoning", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "reasoning_content": "Greeting.", "content": "Hello!"},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "reasoning_content": "Paris, obviously.", "content": "Paris."},
                  {"role": "user", "content": "And of Italy?"}]},
    {"name": "multi_turn_thinking_last_assistant", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "reasoning_content": "Greeting.", "content": "Hello!"},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "reasoning_content": "Paris, obviously.", "content": "Paris."}]},
    {"name": "multi_turn_thinking_keep_reasoning", "thinking_mode": "thinking", "drop_thinking": False,
     "messages": [SYSTEM, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "reasoning_content": "Greeting.", "content": "Hello!"},
                  {"role": "user", "content": "Capital of France?"}]},
    {"name": "think_high", "thinking_mode": "thinking", "reasoning_effort": "high",
     "messages": [SYSTEM, {"role": "user", "content": "Prove that sqrt(2) is irrational."}]},
    {"name": "think_max", "thinking_mode": "thinking", "reasoning_effort": "max",
     "messages": [SYSTEM, {"role": "user", "content": "Prove that sqrt(2) is irrational."}]},
    {"name": "think_max_no_system", "thinking_mode": "thinking", "reasoning_effort": "max",
     "messages": [{"role": "user", "content": "Find all integer solutions of x^2 - 2y^2 = 1."}]},
    {"name": "chat_max_has_no_prefix", "thinking_mode": "chat", "reasoning_effort": "max",
     "messages": [SYSTEM, {"role": "user", "content": "Quick answer: 7*8?"}]},
    {"name": "tools_thinking", "thinking_mode": "thinking",
     "messages": [dict(SYSTEM, tools=WEATHER_TOOLS)] + TOOL_TURNS},
    {"name": "tools_chat", "thinking_mode": "chat",
     "messages": [dict(SYSTEM, tools=WEATHER_TOOLS)] + TOOL_TURNS},
    {"name": "tools_pending_results", "thinking_mode": "thinking",
     "messages": [dict(SYSTEM, tools=WEATHER_TOOLS)] + TOOL_TURNS[:5]},
    {"name": "tools_empty_system", "thinking_mode": "thinking",
     "messages": [{"role": "system", "content": "", "tools": WEATHER_TOOLS},
                  {"role": "user", "content": "weather in Paris?"}]},
    {"name": "tools_empty_list_is_no_tools", "thinking_mode": "thinking",
     "messages": [dict(SYSTEM, tools=[]), {"role": "user", "content": "Hi"},
                  {"role": "assistant", "reasoning_content": "r", "content": "c"},
                  {"role": "user", "content": "again"}]},
    {"name": "tool_argument_types", "thinking_mode": "chat",
     "messages": [dict(SYSTEM, tools=WEATHER_TOOLS), {"role": "user", "content": "go"},
                  {"role": "assistant", "content": "Calling.", "tool_calls": [
                      call("a", "search", "{\"query\": \"line1\\nline2 \\\"q\\\" <tag> 中文\", \"top_k\": 10, "
                                          "\"exact\": true, \"ratio\": 0.25, \"big\": 1e+21, \"none\": null, "
                                          "\"list\": [1, \"two\", {\"three\": 3}], \"nested\": {\"a\": {\"b\": []}}, "
                                          "\"empty\": \"\", \"ctrl\": \"tab\\there\\u0001\"}"),
                      call("b", "get_weather", "{}")]},
                  {"role": "tool", "tool_call_id": "a", "content": "ok"},
                  {"role": "tool", "tool_call_id": "b", "content": "ok2"}]},
    {"name": "tool_result_content_parts", "thinking_mode": "thinking",
     "messages": [dict(SYSTEM, tools=WEATHER_TOOLS), {"role": "user", "content": "look"},
                  {"role": "assistant", "reasoning_content": "one call", "content": None,
                   "tool_calls": [call("c1", "search", "{\"query\": \"cats\"}")]},
                  {"role": "tool", "tool_call_id": "c1", "content": [
                      {"type": "text", "text": "first part"}, {"type": "image_url", "image_url": {"url": "x"}},
                      {"type": "text", "text": "second part"}]}]},
    {"name": "tool_then_user_text_merged", "thinking_mode": "chat",
     "messages": [dict(SYSTEM, tools=WEATHER_TOOLS), {"role": "user", "content": "look"},
                  {"role": "assistant", "content": "",
                   "tool_calls": [call("c1", "search", "{\"query\": \"dogs\"}")]},
                  {"role": "tool", "tool_call_id": "c1", "content": "result"},
                  {"role": "user", "content": "Also consider cats."}]},
    {"name": "consecutive_user_messages", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "part one"}, {"role": "user", "content": "part two"}]},
    {"name": "developer_tools_latest_reminder", "thinking_mode": "thinking",
     "messages": [{"role": "system", "content": "该助手为DeepSeek。"},
                  {"role": "latest_reminder", "content": "2026-11-23,星期一,北京,App,中文"},
                  {"role": "developer", "content": "布洛芬和对乙酰氨基酚能一起吃吗？", "tools": WEATHER_TOOLS[1:]},
                  {"role": "assistant", "reasoning_content": "需要搜索。", "content": "",
                   "tool_calls": [call("s1", "search", "{\"query\": \"布洛芬 对乙酰氨基酚\"}")]},
                  {"role": "tool", "tool_call_id": "s1", "content": "搜索结果……"},
                  {"role": "assistant", "reasoning_content": "总结。", "content": "一般不建议同时服用。"}]},
    {"name": "developer_dropped_before_last_user", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "developer", "content": "internal instruction"},
                  {"role": "assistant", "reasoning_content": "x", "content": "y"},
                  {"role": "user", "content": "next"}]},
    {"name": "latest_reminder_after_assistant", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "latest_reminder", "content": "2026-11-23"}, {"role": "user", "content": "date?"}]},
    {"name": "response_format", "thinking_mode": "chat",
     "messages": [dict(SYSTEM, response_format={"type": "json_schema", "json_schema": {
         "name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "number"}}}}}),
                  {"role": "user", "content": "2+2 as JSON"}]},
    {"name": "task_action_chat", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "今天上海天气怎么样？", "task": "action"}]},
    {"name": "task_action_thinking", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Latest SpaceX launch?", "task": "action"}]},
    {"name": "task_query", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "Best ramen in Tokyo", "task": "query"}]},
    {"name": "task_authority", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Is ibuprofen safe with alcohol?", "task": "authority"}]},
    {"name": "task_domain", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "How do I fix a segfault in C++?", "task": "domain"}]},
    {"name": "task_read_url", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "task": "read_url",
                           "content": "Summarize https://example.com/a<｜extracted_url｜>https://example.com/a"}]},
    {"name": "task_title", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "Explain quicksort."},
                  {"role": "assistant", "content": "Quicksort picks a pivot...", "task": "title"}]},
    {"name": "task_title_answered", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Explain quicksort."},
                  {"role": "assistant", "reasoning_content": "r", "content": "Quicksort picks a pivot...",
                   "task": "title"},
                  {"role": "assistant", "content": "Quicksort explained"}]},
    {"name": "task_action_answered", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "weather now?", "task": "action"},
                  {"role": "assistant", "content": "Search"}]},
    {"name": "assistant_prefill_wo_eos", "thinking_mode": "thinking",
     "messages": [SYSTEM, {"role": "user", "content": "Write a haiku."},
                  {"role": "assistant", "reasoning_content": "Five, seven, five.", "content": "Autumn moon",
                   "wo_eos": True}]},
    {"name": "special_text_in_content", "thinking_mode": "chat",
     "messages": [SYSTEM, {"role": "user", "content": "What does <think> or </think> mean? Also \"<｜DSML｜\"."}]},
    {"name": "unicode_whitespace_content", "thinking_mode": "thinking",
     "messages": [{"role": "system", "content": "  spaced\tsystem \n\n"},
                  {"role": "user", "content": "emoji 👨‍👩‍👧 and\r\nCRLF and   runs     of spaces 12345"}]},
]

DSML = "｜DSML｜"


def dsml_block(*invokes):
    body = "\n".join(f"<{DSML}invoke name=\"{name}\">\n" + "\n".join(
        f"<{DSML}parameter name=\"{k}\" string=\"{s}\">{v}</{DSML}parameter>" for k, s, v in params)
        + f"\n</{DSML}invoke>" for name, params in invokes)
    return f"\n\n<{DSML}tool_calls>\n{body}\n</{DSML}tool_calls>"


EOS = "<｜end▁of▁sentence｜>"

COMPLETIONS = [
    {"name": "thinking_content", "thinking_mode": "thinking",
     "completion": "Simple arithmetic.</think>2 + 2 = 4." + EOS},
    {"name": "chat_content", "thinking_mode": "chat", "completion": "Hello there!\n\nHow can I help?" + EOS},
    {"name": "thinking_multiline", "thinking_mode": "thinking",
     "completion": "Line 1\nLine 2 with 中文 and emoji 🙂\n</think>\n\nAnswer with a <tag> and </b>." + EOS},
    {"name": "thinking_one_call", "thinking_mode": "thinking",
     "completion": "Need weather." + "</think>" + dsml_block(
         ("get_weather", [("city", "true", "Beijing"), ("unit", "true", "celsius")])) + EOS},
    {"name": "chat_two_calls_typed", "thinking_mode": "chat",
     "completion": "Let me check." + dsml_block(
         ("search", [("query", "true", "a \"quoted\"\nmulti-line <b>value</b>"), ("top_k", "false", "3"),
                     ("filters", "false", "{\"lang\": \"en\", \"tags\": [1, 2]}"), ("exact", "false", "true")]),
         ("get_weather", [("city", "true", "東京")])) + EOS},
    {"name": "chat_call_no_params", "thinking_mode": "chat",
     "completion": dsml_block(("get_time", [])) + EOS},
    {"name": "thinking_empty_reasoning_call", "thinking_mode": "thinking",
     "completion": "</think>" + dsml_block(("search", [("query", "true", "")])) + EOS},
]
