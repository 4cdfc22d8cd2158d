"""Tool calls without a model: the Hermes rendering, the forced-call schemas, and reading calls
out of text as it streams (the "auto" choice, which the small demo model rarely exercises)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tuneserve.engine.grammar import check_constraint
from tuneserve.server.protocol import ChatCompletionRequest
from tuneserve.server.tools import ToolCallReader, forced_call_constraint, hermes_messages

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def read(reader: ToolCallReader, pieces: list[str]) -> tuple[str, list[Any]]:
    content, deltas = "", list[Any]()
    for piece in pieces:
        text, calls = reader.feed(piece)
        content, deltas = content + text, deltas + calls
    text, calls = reader.end()
    return content + text, deltas + calls


def split_everywhere(text: str) -> list[list[str]]:
    """The text cut into two pieces at every position (a tag may arrive in halves)."""
    return [[text[:i], text[i:]] for i in range(len(text) + 1)]


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("pieces", split_everywhere(f"Let me check. {CALL}"))
def test_auto_reads_a_call_whatever_the_chunking(pieces: list[str]) -> None:
    reader = ToolCallReader(request(tools=[WEATHER]))
    content, deltas = read(reader, pieces)
    assert content == "Let me check. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reader.calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert [(d.index, d.id, d.function.name) for d in deltas] == [
        (0, reader.calls[0].id, "get_weather")
    ]


def test_auto_keeps_what_does_not_parse_as_content_and_honours_parallel_false() -> None:
    broken = "<tool_call>{not json}</tool_call>"
    reader = ToolCallReader(request(tools=[WEATHER]))
    content, _ = read(reader, [f"a {broken} b"])
    assert content == f"a  b{broken}" and reader.calls == []
    single = ToolCallReader(request(tools=[WEATHER], parallel_tool_calls=False))
    read(single, [CALL, CALL.replace("Paris", "Rome")])
    assert [json.loads(c.function.arguments)["city"] for c in single.calls] == ["Paris"]
    unclosed = ToolCallReader(request(tools=[WEATHER]))
    read(unclosed, [CALL.removesuffix("</tool_call>")])  # stopped before its closing tag
    assert [c.function.name for c in unclosed.calls] == ["get_weather"]


def test_without_tools_or_with_none_the_text_is_content() -> None:
    for fields in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        reader = ToolCallReader(request(**fields))
        assert read(reader, [CALL]) == (CALL, []) and reader.calls == []


def test_a_named_call_streams_its_arguments_as_they_come() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    reader = ToolCallReader(request(tools=[WEATHER, TIME], tool_choice=named))
    content, deltas = read(reader, ['{"city": ', '"Paris"}'])
    assert content == ""
    assert deltas[0].id == reader.calls[0].id and deltas[0].function.name == "get_weather"
    assert [d.function.name for d in deltas[1:]] == [None]
    assert "".join(d.function.arguments for d in deltas) == '{"city": "Paris"}'
    assert reader.calls[0].function.arguments == '{"city": "Paris"}'


def test_forced_constraints_are_enforceable_schemas() -> None:
    named = forced_call_constraint(
        request(
            tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
        )
    )
    assert named is not None and json.loads(named.spec) == WEATHER["function"]["parameters"]
    required = forced_call_constraint(
        request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    )
    assert required is not None
    schema = json.loads(required.spec)
    assert schema["maxItems"] == 1
    names = [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    for constraint in (named, required):
        check_constraint(constraint)
    assert forced_call_constraint(request(tools=[WEATHER])) is None


def test_hermes_rendering_of_tools_calls_and_results() -> None:
    chat = request(
        tools=[WEATHER],
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "2", "content": "rain"},
        ],
    )
    assert chat.tools is not None
    messages = hermes_messages([m.to_template() for m in chat.messages], chat.tools)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"].count("<tool_call>") == 2
    assert '{"name": "get_weather", "arguments": {"city": "Rome"}}' in messages[2]["content"]
    assert messages[3]["content"] == (
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    )
