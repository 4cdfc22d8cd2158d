"""Every error in OpenAI's shape, naming the field: through the `openai` client and raw HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tuneserve.models.demo import BASE_EXAMPLES

HELLO = BASE_EXAMPLES[0][0]
ERROR_KEYS = {"message", "type", "param", "code"}


def body_of(error: openai.APIStatusError) -> dict[str, Any]:
    """The error's JSON body (the client types it `object`)."""
    assert isinstance(error.body, dict), error.body
    return error.body


def chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", HELLO)
    return client.chat.completions.create(model=model, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body  # never FastAPI's {"detail": ...}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["param"] == param
    return dict(body["error"])


@pytest.mark.parametrize(
    "kwargs,param,words",
    [
        pytest.param(
            {"max_tokens": -1}, "max_tokens", ["-1", "greater than"], id="negative-max-tokens"
        ),
        pytest.param(
            {"max_completion_tokens": 0}, "max_completion_tokens", ["0"], id="zero-max-completion"
        ),
        pytest.param(
            {"temperature": 2.5},
            "temperature",
            ["2.5", "less than or equal to 2"],
            id="temperature-high",
        ),
        pytest.param({"temperature": -0.1}, "temperature", ["-0.1"], id="temperature-negative"),
        pytest.param({"top_p": 0}, "top_p", ["greater than 0"], id="top-p-zero"),
        pytest.param({"top_p": 1.5}, "top_p", ["1.5"], id="top-p-high"),
        pytest.param({"n": 0}, "n", ["greater than or equal to 1"], id="n-zero"),
        pytest.param({"messages": []}, "messages", ["at least 1"], id="empty-messages"),
        pytest.param(
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
            ["'robot'", "'user'"],
            id="unknown-role",
        ),
        pytest.param(
            {"messages": [{"role": "user"}]},
            "messages[0].content",
            ["needs content"],
            id="missing-content",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
            ["'text'"],
            id="image-part",
        ),
        pytest.param(
            {"stream_options": {"include_usage": True}},
            "stream_options",
            ["stream"],
            id="stream-options-without-stream",
        ),
        pytest.param({"extra_body": {"top_k": -2}}, "top_k", ["-2"], id="top-k"),
        pytest.param(
            {"extra_body": {"repetition_penalty": 0}},
            "repetition_penalty",
            ["greater than 0"],
            id="repetition-penalty",
        ),
        pytest.param(
            {"extra_body": {"min_tokens": 9}, "max_tokens": 2},
            "min_tokens",
            ["9"],
            id="min-over-max",
        ),
        pytest.param({"n": 17}, "n", ["17", "less than or equal to 16"], id="n-over-limit"),
        pytest.param(
            {"logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            ["21", "less than or equal to 20"],
            id="top-logprobs-over-limit",
        ),
        pytest.param({"top_logprobs": 2}, "top_logprobs", ["logprobs"], id="top-without-logprobs"),
        pytest.param(
            {"frequency_penalty": 2.5}, "frequency_penalty", ["2.5"], id="frequency-penalty"
        ),
        pytest.param({"logit_bias": {"abc": 1}}, "logit_bias", ["token ids"], id="bias-key"),
        pytest.param({"logit_bias": {"5": 101}}, "logit_bias", ["-100 to 100"], id="bias-value"),
        pytest.param(
            {"logit_bias": {"999999": 1}}, "logit_bias", ["999999", "out of range"], id="bias-id"
        ),
        pytest.param({"store": True}, "store", ["does not store"], id="store"),
        pytest.param(
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
            ["only false"],
            id="obfuscation",
        ),
        pytest.param({"audio": {"voice": "alloy", "format": "wav"}}, "audio", ["text"], id="audio"),
        pytest.param({"modalities": ["text", "audio"]}, "modalities", ["text"], id="modalities"),
        pytest.param({"reasoning_effort": "high"}, "reasoning_effort", ["not"], id="reasoning"),
        pytest.param({"service_tier": "flex"}, "service_tier", ["'auto'"], id="service-tier"),
        pytest.param({"metadata": {"a": "b"}}, "metadata", ["stored"], id="metadata"),
        pytest.param(
            {"prediction": {"type": "content", "content": "x"}},
            "prediction",
            ["not supported"],
            id="prediction",
        ),
        pytest.param(
            {"functions": [{"name": "f", "parameters": {}}]}, "functions", ["tools"], id="functions"
        ),
        pytest.param(
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "string", "format": "no-such-format"},
                    },
                }
            },
            "response_format",
            ["cannot be enforced", "no-such-format"],
            id="schema-feature",
        ),
        pytest.param(
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            ["required"],
            id="schema-missing",
        ),
        pytest.param(
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}},
            "response_format",
            ["one output constraint"],
            id="two-constraints",
        ),
        pytest.param({"tool_choice": "required"}, "tool_choice", ["needs tools"], id="no-tools"),
        pytest.param(
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            ["'g'", "f"],
            id="unknown-tool",
        ),
        pytest.param(
            {"messages": [{"role": "tool", "content": "42"}]},
            "messages[0].tool_call_id",
            ["names the call"],
            id="tool-without-call-id",
        ),
    ],
)
def test_bad_chat_parameters(
    client: openai.OpenAI, base_id: str, kwargs: dict[str, Any], param: str, words: list[str]
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, base_id, **kwargs)
    error = info.value
    assert error.status_code == 400
    assert body_of(error)["type"] == "invalid_request_error"
    assert body_of(error)["param"] == param
    message = body_of(error)["message"]
    assert f"'{param}'" in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "body,param,words",
    [
        pytest.param(
            {"messages": "Hello"}, "messages", ["valid list", "'Hello'"], id="messages-a-string"
        ),
        pytest.param({"n": "two"}, "n", ["valid integer", "'two'"], id="n-a-string"),
        pytest.param({"temperature": "hot"}, "temperature", ["'hot'"], id="temperature-a-string"),
        pytest.param({"stop": 5}, "stop", ["5"], id="stop-a-number"),
        pytest.param(
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
            ["3"],
            id="content-a-number",
        ),
        pytest.param({"model": None}, "model", ["valid string"], id="model-null"),
    ],
)
def test_wrong_field_types(
    http: httpx.Client, base_id: str, body: dict[str, Any], param: str, words: list[str]
) -> None:
    request = {"model": base_id, "messages": HELLO, **body}
    error = assert_openai_error(http.post("/v1/chat/completions", json=request), 400, param)
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


def test_missing_fields_are_named(http: httpx.Client) -> None:
    error = assert_openai_error(http.post("/v1/chat/completions", json={}), 400, "messages")
    assert "Missing required field 'messages'" in error["message"]
    assert "'model'" in error["message"]


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    error = assert_openai_error(response, 400, None)
    assert "not valid JSON" in error["message"] and "character" in error["message"]


def test_body_not_an_object(http: httpx.Client) -> None:
    error = assert_openai_error(http.post("/v1/completions", json=[1, 2]), 400, None)
    assert "JSON object" in error["message"]


def test_json_without_content_type_is_explained(http: httpx.Client, base_id: str) -> None:
    response = http.post(
        "/v1/chat/completions",
        content=b'{"model": "%s"}' % base_id.encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    error = assert_openai_error(response, 400, None)
    assert "Content-Type: application/json" in error["message"]


def test_unknown_model_is_404(client: openai.OpenAI, base_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, "no-such-adapter")
    assert info.value.status_code == 404
    assert body_of(info.value)["param"] == "model"
    assert body_of(info.value)["code"] == "model_not_found"
    assert (
        base_id in body_of(info.value)["message"] and "capitals" in body_of(info.value)["message"]
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        chat(client, "nope", stream=True)  # before the stream starts: a plain 404


def test_prompt_longer_than_the_context(client: openai.OpenAI, base_id: str) -> None:
    extra = client.models.list().data[0].model_extra
    assert extra is not None
    limit = extra["max_model_len"]
    long_text = "Hello " * (limit + 10)
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, base_id, messages=[{"role": "user", "content": long_text}])
    assert body_of(info.value)["param"] == "messages"
    assert body_of(info.value)["code"] == "context_length_exceeded"
    assert str(limit) in body_of(info.value)["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=base_id, prompt=long_text)
    assert body_of(info.value)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, base_id, max_tokens=limit)
    assert body_of(info.value)["param"] == "max_tokens"
    assert body_of(info.value)["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body,param",
    [
        pytest.param({"prompt": []}, "prompt", id="empty-list"),
        pytest.param({"prompt": [[1, 2], []]}, "prompt", id="an-empty-prompt"),
        pytest.param({"prompt": [10**9]}, "prompt", id="token-out-of-vocab"),
        pytest.param({"prompt": "hi", "suffix": "x"}, "suffix", id="suffix"),
        pytest.param({"prompt": "hi", "best_of": 3}, "best_of", id="best-of"),
        pytest.param({"prompt": "hi", "best_of": 17, "n": 17}, "n", id="n-over-limit"),
        pytest.param({"prompt": "hi", "logprobs": 6}, "logprobs", id="logprobs-over-5"),
        pytest.param({"prompt": "hi", "logprobs": 1, "echo": True}, "logprobs", id="echo-logprobs"),
        pytest.param({"prompt": "hi", "n": -1}, "n", id="n-negative"),
        pytest.param({"prompt": 3.5}, "prompt", id="prompt-a-float"),
    ],
)
def test_bad_completion_requests(
    http: httpx.Client, base_id: str, body: dict[str, Any], param: str
) -> None:
    response = http.post("/v1/completions", json={"model": base_id, **body})
    error = assert_openai_error(response, 400, param)
    assert f"'{param}'" in error["message"], error["message"]


@pytest.mark.parametrize(
    "route,body,param",
    [
        pytest.param("/v1/chat/completions", {"messages": HELLO, "temprature": 0}, "temprature"),
        pytest.param("/v1/chat/completions", {"messages": HELLO, "Top-P": 1}, "Top-P"),
        pytest.param(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi", "mood": "good"}]},
            "messages[0].mood",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"messages": HELLO, "response_format": {"type": "json_object", "schema": {}}},
            "response_format.schema",
        ),
        pytest.param("/v1/completions", {"prompt": "hi", "chat_template": "x"}, "chat_template"),
    ],
)
def test_unknown_fields_are_refused_as_openai_does(
    http: httpx.Client, base_id: str, route: str, body: dict[str, Any], param: str
) -> None:
    response = http.post(route, json={"model": base_id, **body})
    error = assert_openai_error(response, 400, param)
    assert f"Unrecognized request argument supplied: {param}" in error["message"]


def test_documented_fields_that_ask_for_nothing_are_accepted(
    client: openai.OpenAI, base_id: str
) -> None:
    answer = chat(
        client,
        base_id,
        max_tokens=2,
        store=False,
        service_tier="auto",
        modalities=["text"],
        user="someone",
        safety_identifier="someone",
        stream_options=None,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert answer.choices[0].message.content in ("yes", "no")


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    error = assert_openai_error(http.get("/v1/no/such/route"), 404, None)
    assert error["type"] == "not_found_error"
    error = assert_openai_error(http.get("/v1/chat/completions"), 405, None)
    assert "POST" in error["message"]
