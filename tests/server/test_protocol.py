"""The request models of server/protocol.py on their own: no server, no model.

Each refusal goes through `describe_validation_error`, the function that turns pydantic's
errors into the API's 400, so the param and the wording checked here are the ones a client
gets (tests/server/test_errors.py checks the same through a live server)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tuneserve.engine.types import Constraint
from tuneserve.server.error_handlers import describe_validation_error
from tuneserve.server.protocol import (
    MAX_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_TOP_LOGPROBS,
    NOT_IMPLEMENTED,
    ChatCompletionRequest,
    CompletionRequest,
)

HELLO = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
UNKNOWN = "Unrecognized request argument supplied"  # OpenAI's words


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **fields}


def refusal(model: type[BaseModel], body: dict[str, Any]) -> tuple[str | None, str]:
    """(param, message) of the 400 the body gets."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    error = describe_validation_error(info.value.errors())
    assert error.status_code == 400 and error.type == "invalid_request_error"
    return error.param, error.message


# -- unknown fields ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        pytest.param(ChatCompletionRequest, chat(temprature=0.5), "temprature", id="chat-top"),
        pytest.param(CompletionRequest, completion(temprature=0.5), "temprature", id="completion"),
        pytest.param(
            ChatCompletionRequest,
            chat(messages=[{"role": "user", "content": "hi", "mood": "calm"}]),
            "messages[0].mood",
            id="in-a-message",
        ),
        pytest.param(
            ChatCompletionRequest,
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]),
            "messages[0].content[0].x",
            id="in-a-content-part",
        ),
        pytest.param(
            ChatCompletionRequest,
            chat(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {}, "extra": 1},
                }
            ),
            "response_format.json_schema.extra",
            id="in-json-schema",
        ),
        pytest.param(
            ChatCompletionRequest,
            chat(stream=True, stream_options={"include_usage": True, "every": 2}),
            "stream_options.every",
            id="in-stream-options",
        ),
        pytest.param(
            ChatCompletionRequest,
            chat(tools=[{"type": "function", "function": {"name": "f", "returns": "int"}}]),
            "tools[0].function.returns",
            id="in-a-tool",
        ),
        # Not OpenAI's completions fields: unknown there, not "not implemented".
        pytest.param(CompletionRequest, completion(store=False), "store", id="store-completions"),
        pytest.param(ChatCompletionRequest, chat(suffix=""), "suffix", id="suffix-in-chat"),
    ],
)
def test_an_unknown_field_is_refused_by_its_path_in_openai_words(
    model: type[BaseModel], body: dict[str, Any], param: str
) -> None:
    got_param, message = refusal(model, body)
    assert got_param == param
    assert message == f"{UNKNOWN}: {param}."


# -- documented fields this server does not implement ----------------------------------------
CHAT_NOT_IMPLEMENTED = sorted(set(NOT_IMPLEMENTED) - {"suffix"})


def _neutral_cases() -> list[Any]:
    cases = []
    for name, (neutral, _) in NOT_IMPLEMENTED.items():
        for value in neutral:
            cases.append(pytest.param(name, value, id=f"{name}={value!r}"))
    return cases


def _validate_either(name: str, value: Any) -> BaseModel:
    if name == "suffix":
        return CompletionRequest.model_validate(completion(suffix=value))
    return ChatCompletionRequest.model_validate(chat(**{name: value}))


@pytest.mark.parametrize(("name", "value"), _neutral_cases())
def test_a_not_implemented_field_at_a_neutral_value_is_accepted_and_dropped(
    name: str, value: Any
) -> None:
    request = _validate_either(name, value)
    assert name not in request.model_fields_set
    assert name not in request.model_dump()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *((name, {"asked": True}) for name in NOT_IMPLEMENTED),
        ("store", True),
        ("modalities", ["text", "audio"]),
        ("service_tier", "flex"),
        ("suffix", " and so on"),
        ("reasoning_effort", "low"),
    ],
)
def test_a_not_implemented_field_asking_for_something_is_refused_with_the_reason(
    name: str, value: Any
) -> None:
    model: type[BaseModel] = CompletionRequest if name == "suffix" else ChatCompletionRequest
    body = completion(suffix=value) if name == "suffix" else chat(**{name: value})
    param, message = refusal(model, body)
    assert param == name
    assert message == f"Invalid value for '{name}': {NOT_IMPLEMENTED[name][1]}."


def test_every_not_implemented_field_belongs_to_an_endpoint() -> None:
    """A NOT_IMPLEMENTED entry that no request lists would be refused as unknown instead."""
    for name in CHAT_NOT_IMPLEMENTED:
        assert refusal(ChatCompletionRequest, chat(**{name: {"asked": True}}))[0] == name
    assert refusal(CompletionRequest, completion(suffix="x"))[0] == "suffix"


# -- ranges ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "body", "param", "words"),
    [
        (ChatCompletionRequest, chat(n=0), "n", "greater than or equal to 1"),
        (ChatCompletionRequest, chat(n=MAX_CHOICES + 1), "n", "less than or equal to 16"),
        (CompletionRequest, completion(n=-1), "n", "greater than or equal to 1"),
        (CompletionRequest, completion(best_of=3), "best_of", "only best_of == n (1)"),
        (CompletionRequest, completion(n=2, best_of=1), "best_of", "got 1"),
        (CompletionRequest, completion(n=17, best_of=17), "n", "less than or equal to 16"),
        (CompletionRequest, completion(best_of=0), "best_of", "greater than or equal to 1"),
        (
            ChatCompletionRequest,
            chat(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1),
            "top_logprobs",
            "less than or equal to 20",
        ),
        (ChatCompletionRequest, chat(logprobs=True, top_logprobs=-1), "top_logprobs", "0"),
        (ChatCompletionRequest, chat(top_logprobs=2), "top_logprobs", "needs logprobs"),
        (ChatCompletionRequest, chat(logprobs=False, top_logprobs=2), "top_logprobs", "needs"),
        (
            CompletionRequest,
            completion(logprobs=MAX_COMPLETION_LOGPROBS + 1),
            "logprobs",
            "less than or equal to 5",
        ),
        (CompletionRequest, completion(logprobs=1, echo=True), "logprobs", "echo"),
        (ChatCompletionRequest, chat(temperature=2.01), "temperature", "less than or equal"),
        (ChatCompletionRequest, chat(temperature=-0.1), "temperature", "greater than or equal"),
        (ChatCompletionRequest, chat(top_p=0), "top_p", "greater than 0"),
        (ChatCompletionRequest, chat(top_p=1.5), "top_p", "less than or equal to 1"),
        (ChatCompletionRequest, chat(frequency_penalty=2.5), "frequency_penalty", "2"),
        (ChatCompletionRequest, chat(presence_penalty=-2.5), "presence_penalty", "-2"),
        (ChatCompletionRequest, chat(top_k=-2), "top_k", "greater than or equal to -1"),
        (ChatCompletionRequest, chat(repetition_penalty=0), "repetition_penalty", "greater"),
        (ChatCompletionRequest, chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (ChatCompletionRequest, chat(max_completion_tokens=0), "max_completion_tokens", "1"),
        (CompletionRequest, completion(max_tokens=0), "max_tokens", "greater than or equal"),
        (ChatCompletionRequest, chat(min_tokens=-1), "min_tokens", "greater than or equal"),
        (
            ChatCompletionRequest,
            chat(max_tokens=100, max_completion_tokens=4, min_tokens=5),
            "min_tokens",
            "5 is more than max_tokens (4)",
        ),
        (CompletionRequest, completion(min_tokens=17), "min_tokens", "more than max_tokens (16)"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(
    model: type[BaseModel], body: dict[str, Any], param: str, words: str
) -> None:
    got_param, message = refusal(model, body)
    assert got_param == param
    assert message.startswith(f"Invalid value for '{param}': "), message
    assert words in message, message


def test_the_limits_themselves_are_accepted() -> None:
    top = ChatCompletionRequest.model_validate(
        chat(n=MAX_CHOICES, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS, temperature=2)
    )
    assert len(top.to_sampling_params(8)) == MAX_CHOICES
    assert top.logprob_count() == MAX_TOP_LOGPROBS
    low = CompletionRequest.model_validate(
        completion(n=MAX_CHOICES, best_of=MAX_CHOICES, logprobs=MAX_COMPLETION_LOGPROBS)
    )
    assert low.logprob_count() == MAX_COMPLETION_LOGPROBS
    # no max_tokens at all: min_tokens has nothing to exceed
    unbounded = CompletionRequest.model_validate(completion(max_tokens=None, min_tokens=50))
    assert unbounded.to_sampling_params(100)[0].min_tokens == 50


@pytest.mark.parametrize(
    ("fields", "count"),
    [({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0), ({"top_logprobs": 0}, None)],
)
def test_chat_logprob_count(fields: dict[str, Any], count: int | None) -> None:
    request = ChatCompletionRequest.model_validate(chat(**fields))
    assert request.logprob_count() == count
    assert request.to_sampling_params(4)[0].logprobs == count


def test_completion_logprobs_zero_means_the_chosen_token_only() -> None:
    assert CompletionRequest.model_validate(completion(logprobs=0)).logprob_count() == 0
    assert CompletionRequest.model_validate(completion()).logprob_count() is None


# -- logit_bias ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bias", "words"),
    [
        ({"hello": 1}, "keys are token ids written as strings, got 'hello'"),
        ({"-5": 1}, "got '-5'"),
        ({"1.5": 1}, "got '1.5'"),
        ({"": 1}, "got ''"),
        # str.isdigit() holds for these; int() refuses the first and reads the second as 3
        ({"³": 1}, "got '³'"),
        ({"٣": 1}, "got '٣'"),
        ({"5": 100.5}, "biases go from -100 to 100, got 100.5 for token 5"),
        ({"5": -101}, "got -101"),
        ({"5": float("nan")}, "got nan"),
    ],
)
def test_logit_bias_takes_token_ids_and_biases_within_100(
    bias: dict[str, float], words: str
) -> None:
    param, message = refusal(ChatCompletionRequest, chat(logit_bias=bias))
    assert param == "logit_bias"
    assert words in message, message


def test_logit_bias_reaches_the_engine_as_integer_ids() -> None:
    request = CompletionRequest.model_validate(
        completion(logit_bias={"0": -100, "50256": 100, "7": 2.5})
    )
    [params] = request.to_sampling_params(4)
    assert params.logit_bias == ((0, -100.0), (50256, 100.0), (7, 2.5))


# -- stop ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stop", "strings"),
    [
        (None, ()),
        ("\n", ("\n",)),
        (["a", "b", "c", "d", "e", "f"], ("a", "b", "c", "d", "e", "f")),  # more than 4: kept
        ("", ()),  # clients send "" to mean none; it would end every text at once
        (["", "end", ""], ("end",)),
        ([], ()),
    ],
)
def test_stop_strings(stop: Any, strings: tuple[str, ...]) -> None:
    request = ChatCompletionRequest.model_validate(chat(stop=stop))
    assert request.stop_strings() == strings
    assert request.to_sampling_params(4)[0].stop == strings


def test_stop_must_hold_strings() -> None:
    param, message = refusal(ChatCompletionRequest, chat(stop=["end", 3]))
    assert param == "stop[1]"
    assert "valid string" in message and "(got 3)" in message
    assert refusal(CompletionRequest, completion(stop=5))[0] == "stop"


# -- response_format and the other output constraints ---------------------------------------
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    ("response_format", "constraint"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, Constraint("json_schema", '{"type": "object"}')),
        (
            {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
            Constraint("json_schema", json.dumps(SCHEMA)),
        ),
        (  # no schema: any JSON
            {"type": "json_schema", "json_schema": {"name": "any", "strict": True}},
            Constraint("json_schema", "{}"),
        ),
    ],
)
def test_response_format_variants_become_the_engine_constraint(
    response_format: dict[str, Any], constraint: Constraint | None
) -> None:
    request = ChatCompletionRequest.model_validate(chat(response_format=response_format))
    assert request.constraint() == constraint
    assert all(p.constraint == constraint for p in request.to_sampling_params(4))


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "json_schema"}, "response_format.json_schema", "is required when type"),
        ({"type": "xml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
        ({}, "response_format.type", "Missing required field"),
        (
            {"type": "json_schema", "json_schema": {"name": "x" * 65}},
            "response_format.json_schema.name",
            "at most 64 characters",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
            "response_format.json_schema.name",
            "Missing required field",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integr"}}},
            "response_format",
            "cannot be enforced",
        ),
    ],
)
def test_bad_response_formats_are_refused(
    response_format: dict[str, Any], param: str, words: str
) -> None:
    got_param, message = refusal(ChatCompletionRequest, chat(response_format=response_format))
    assert got_param == param
    assert words in message, message


def test_one_output_constraint_at_a_time() -> None:
    param, message = refusal(
        ChatCompletionRequest, chat(guided_regex="[a-z]+", response_format={"type": "json_object"})
    )
    assert param == "response_format"  # the second one asked for is the one named
    assert "only one output constraint at a time: got guided_regex and response_format" in message
    param, _ = refusal(CompletionRequest, completion(guided_json=SCHEMA, guided_choice=["a"]))
    assert param == "guided_choice"


@pytest.mark.parametrize(
    ("fields", "constraint"),
    [
        ({"guided_json": SCHEMA}, Constraint("json_schema", json.dumps(SCHEMA))),
        ({"guided_json": '{"type": "string"}'}, Constraint("json_schema", '{"type": "string"}')),
        ({"guided_regex": "[0-9]{3}"}, Constraint("regex", "[0-9]{3}")),
        ({"guided_choice": ["yes", "no"]}, Constraint("choice", '["yes", "no"]')),
    ],
)
def test_guided_fields_become_the_engine_constraint(
    fields: dict[str, Any], constraint: Constraint
) -> None:
    assert CompletionRequest.model_validate(completion(**fields)).constraint() == constraint


def test_unenforceable_guided_fields_are_refused_by_name() -> None:
    param, message = refusal(CompletionRequest, completion(guided_regex="(unclosed"))
    assert param == "guided_regex"
    assert message.startswith("Invalid value for 'guided_regex': cannot be enforced: "), message
    assert refusal(CompletionRequest, completion(guided_choice=[]))[0] == "guided_choice"


# -- tool_choice -----------------------------------------------------------------------------
def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    ("tool_choice", "forced"),
    [("none", False), ("auto", False), ("required", True), (named("get_weather"), True)],
)
def test_tool_choice_shapes_with_tools(tool_choice: Any, forced: bool) -> None:
    request = ChatCompletionRequest.model_validate(chat(tools=[TOOL], tool_choice=tool_choice))
    assert request.forces_tool_call is forced
    assert request.tool_names == ["get_weather"]


def test_tool_choice_none_needs_no_tools() -> None:
    request = ChatCompletionRequest.model_validate(chat(tool_choice="none"))
    assert not request.forces_tool_call and request.tool_names == []


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        ({"tool_choice": "required", "tools": []}, "tool_choice", "needs tools"),
        ({"tool_choice": named("get_weather")}, "tool_choice", "needs tools"),
        (
            {"tool_choice": named("get_time"), "tools": [TOOL]},
            "tool_choice",
            "names 'get_time', which is not among the tools (get_weather)",
        ),
        ({"tool_choice": "sometimes", "tools": [TOOL]}, "tool_choice", "'none', 'auto' or"),
        (
            {
                "tool_choice": "required",
                "tools": [TOOL],
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "a forced tool call cannot have an output format too",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "tools[0].function.name",
            "should match pattern",
        ),
        (
            {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
            "tools[0].type",
            "'function'",
        ),
    ],
)
def test_bad_tool_choices_and_tools_are_refused(
    fields: dict[str, Any], param: str, words: str
) -> None:
    got_param, message = refusal(ChatCompletionRequest, chat(**fields))
    assert got_param == param
    assert words in message, message


@pytest.mark.parametrize(
    ("tool_choice", "param", "words"),
    [
        (
            {"type": "tool", "function": {"name": "get_weather"}},
            "tool_choice.type",
            "Invalid value for 'tool_choice.type': Input should be 'function' (got 'tool').",
        ),
        (
            {"type": "function"},
            "tool_choice.function",
            "Missing required field 'tool_choice.function'.",
        ),
        (
            {"type": "function", "function": {"nam": "get_weather"}},
            "tool_choice.function.name",
            "Missing required field 'tool_choice.function.name'. Unrecognized request argument "
            "supplied: tool_choice.function.nam.",
        ),
    ],
)
def test_a_malformed_named_tool_choice_says_what_is_wrong_inside_it_and_only_that(
    tool_choice: dict[str, Any], param: str, words: str
) -> None:
    # an object is a named choice: not also "should be 'none', 'auto' or 'required'"
    got_param, message = refusal(ChatCompletionRequest, chat(tools=[TOOL], tool_choice=tool_choice))
    assert (got_param, message) == (param, words)


def test_auto_tool_choice_may_go_with_an_output_format() -> None:
    request = ChatCompletionRequest.model_validate(
        chat(tools=[TOOL], tool_choice="auto", response_format={"type": "json_object"})
    )
    assert request.constraint() is not None and not request.forces_tool_call


# -- messages --------------------------------------------------------------------------------
def test_content_parts_are_joined_by_newlines() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    request = ChatCompletionRequest.model_validate(
        chat(messages=[{"role": "user", "content": parts}])
    )
    [message] = request.messages
    assert message.text() == "first\nsecond"
    assert message.to_template() == {"role": "user", "content": "first\nsecond"}


def test_only_text_content_parts_are_accepted() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    param, message = refusal(
        ChatCompletionRequest, chat(messages=[{"role": "user", "content": [image]}])
    )
    assert param == "messages[0].content[0].type"
    assert "Input should be 'text' (got 'image_url')" in message
    # the str branch of `content`'s union is not reported next to the part's real problem
    assert "Invalid value for 'messages[0].content'" not in message


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        ([], "messages", "at least 1 item"),
        ([{"role": "user"}], "messages[0].content", "a 'user' message needs content"),
        ([{"role": "system", "content": None}], "messages[0].content", "'system' message"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role", "'developer'"),
        ([{"content": "hi"}], "messages[0].role", "Missing required field"),
        (
            [{"role": "tool", "content": "sunny"}],
            "messages[0].tool_call_id",
            "a 'tool' message names the call it answers",
        ),
        (
            [
                {
                    "role": "user",
                    "content": "hi",
                    "tool_calls": [
                        {"id": "c1", "function": {"name": "f", "arguments": "{}"}},
                    ],
                }
            ],
            "messages[0].tool_calls",
            "only an assistant message carries tool_calls",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}],
            "messages[1].content",
            "valid string",
        ),
    ],
)
def test_bad_messages_are_refused_by_their_path(
    messages: list[dict[str, Any]], param: str, words: str
) -> None:
    got_param, message = refusal(ChatCompletionRequest, chat(messages=messages))
    assert got_param == param
    assert words in message, message


def test_a_conversation_with_tool_calls_reaches_the_template() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "function": {"name": "get_weather", "arguments": "not json"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    request = ChatCompletionRequest.model_validate(chat(messages=messages, tools=[TOOL]))
    system, _, assistant, tool = (m.to_template() for m in request.messages)
    assert system == {"role": "system", "content": "Be brief."}  # chat templates' old name
    assert assistant["content"] == "" and [
        call["function"]["arguments"] for call in assistant["tool_calls"]
    ] == [{"city": "Paris"}, "not json"]
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


# -- stream_options --------------------------------------------------------------------------
def test_stream_options_need_stream_and_no_obfuscation() -> None:
    param, message = refusal(ChatCompletionRequest, chat(stream_options={"include_usage": True}))
    assert param == "stream_options"
    assert message == "Invalid value for 'stream_options': may only be set when stream is true."
    param, message = refusal(
        CompletionRequest, completion(stream=True, stream_options={"include_obfuscation": True})
    )
    assert param == "stream_options.include_obfuscation" and "only false" in message
    request = CompletionRequest.model_validate(
        completion(
            stream=True, stream_options={"include_usage": True, "include_obfuscation": False}
        )
    )
    assert request.include_usage
    assert not CompletionRequest.model_validate(completion(stream=True)).include_usage


# -- the way out to the engine ---------------------------------------------------------------
def test_sampling_params_per_choice() -> None:
    request = ChatCompletionRequest.model_validate(
        chat(n=3, seed=7, top_k=-1, min_tokens=5, max_completion_tokens=5, max_tokens=50)
    )
    assert request.requested_max_tokens == 5  # max_completion_tokens wins over max_tokens
    params = request.to_sampling_params(4)  # the room left: min_tokens is capped to it
    assert [p.seed for p in params] == [7, 8, 9]
    assert {(p.top_k, p.min_tokens, p.temperature, p.top_p) for p in params} == {(0, 4, 1.0, 1.0)}
    unseeded = ChatCompletionRequest.model_validate(chat(n=2, temperature=0, top_k=40))
    assert [(p.seed, p.temperature, p.top_k) for p in unseeded.to_sampling_params(4)] == [
        (None, 0.0, 40),
        (None, 0.0, 40),
    ]


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_shapes(prompt: Any, prompts: list[Any]) -> None:
    assert CompletionRequest.model_validate(completion(prompt=prompt)).prompts() == prompts


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([], "Invalid value for 'prompt': must not be empty, nor hold an empty prompt"),
        ([[1, 2], []], "Invalid value for 'prompt': must not be empty"),
        (["a", ""], "Invalid value for 'prompt': must not be empty"),
        (3.5, "Invalid value for 'prompt': Input should be a valid string or"),
        (None, "Invalid value for 'prompt': Input should be a valid string or"),
    ],
    ids=repr,
)
def test_bad_completion_prompts_are_refused(prompt: Any, words: str) -> None:
    param, message = refusal(CompletionRequest, completion(prompt=prompt))
    assert param == "prompt"
    assert message.startswith(words), message


def test_a_mixed_prompt_list_names_its_entries() -> None:
    param, message = refusal(CompletionRequest, completion(prompt=[1, "a"]))
    assert param == "prompt[0]"
    assert "Invalid value for 'prompt[1]'" in message and "(got 'a')" in message
