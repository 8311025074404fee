"""The official OpenAI Python SDK against a running v4serve router (run by tests/e2e/openai_sdk_e2e_test.cc).

The router fronts a fake decode worker that answers a weather tool call when the prompt offers the
get_weather tool and a fixed greeting otherwise; everything between the SDK and the worker is real.
"""
import json
import sys

import openai
from openai import OpenAI


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)

    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"], models

    chat = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], temperature=0, seed=1)
    assert chat.choices[0].message.content == "Hello there!\n\nHow can I help?", chat
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == chat.choices[0].message.content, text
    assert finish == "stop" and usage.completion_tokens == chat.usage.completion_tokens

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Weather in Beijing?"}], tools=tools)
    msg = call.choices[0].message
    assert call.choices[0].finish_reason == "tool_calls", call
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Beijing"}

    # Streaming tool calls arrive as tool_call deltas.
    names, args = [], ""
    for chunk in client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Weather in Beijing?"}], tools=tools,
            stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                if tc.function.name:
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
    assert names == ["get_weather"] and json.loads(args) == {"city": "Beijing"}, (names, args)

    # A follow-up turn with the tool result is accepted (rendered with V4's <tool_result> blocks).
    follow = client.chat.completions.create(model="tiny-chat", messages=[
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in msg.tool_calls]},
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 21C"}], tools=tools)
    assert follow.choices[0].message is not None

    try:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}],
                                       temperature=9)
        raise AssertionError("temperature 9 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "temperature" in str(e), e
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e

    completion = client.completions.create(model="tiny-chat", prompt="Say hi", max_tokens=16)
    assert completion.choices[0].text.startswith("Hello"), completion
    print("openai SDK", openai.__version__, ": all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
