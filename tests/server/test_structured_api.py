"""Structured output, tool calls and logprobs on the real demo, through the official `openai`
client: what a user of vLLM or OpenAI would try first (`parse` with a pydantic model, a forced
tool call, `logprobs=True`)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import openai
import pytest
import torch
from openai.types.chat import ChatCompletionFunctionToolParam
from pydantic import BaseModel, ConfigDict, Field

from tuneserve.models.real_demo import MODEL_NAME

pytestmark = pytest.mark.real_model


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=1000)


WEATHER: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PARIS = [{"role": "user", "content": "Tell me about Paris as JSON."}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def client(real_client: openai.OpenAI) -> openai.OpenAI:
    return real_client  # this module's tests all talk to the real demo


@pytest.mark.parametrize("model", [MODEL_NAME, "capitals"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_parse_with_a_pydantic_model(client: openai.OpenAI, model: str, temperature: float) -> None:
    completion = client.chat.completions.parse(
        model=model,
        messages=PARIS,  # type: ignore[arg-type]
        response_format=City,
        temperature=temperature,
        seed=3,
        max_tokens=120,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_parse_streamed(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="pirate",
        messages=PARIS,  # type: ignore[arg-type]
        response_format=City,
        temperature=0,
        max_tokens=120,
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, City)


def test_json_object_and_guided_fields(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {
                "role": "user",
                "content": "Reply with a JSON object with the keys city and country for Paris.",
            }
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=120,
    )
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)
    choice = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model=MODEL_NAME,
        prompt="The year Paris hosted the Olympics:",
        max_tokens=10,
        temperature=0,
        extra_body={"guided_regex": r" \d{4}"},
    )
    text = regex.choices[0].text
    assert len(text) == 5 and text[1:].isdigit()


def test_free_rows_beside_constrained_rows_keep_their_tokens(client: openai.OpenAI) -> None:
    free = [
        (MODEL_NAME, [{"role": "user", "content": "Write a haiku about the sea."}]),
        ("pirate", [{"role": "user", "content": "Hello"}]),
    ]

    def ask_free(item: tuple[str, Any]) -> str:
        model, messages = item
        answer = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=24
        )
        return answer.choices[0].message.content or ""

    def ask_constrained(model: str) -> City | None:
        completion = client.chat.completions.parse(
            model=model,
            messages=PARIS,  # type: ignore[arg-type]
            response_format=City,
            temperature=0,
            max_tokens=120,
        )
        return completion.choices[0].message.parsed

    alone = [ask_free(item) for item in free]
    with ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(ask_constrained, m) for m in (MODEL_NAME, "capitals")]
        together = list(pool.map(ask_free, free))
        assert all(isinstance(c.result(), City) for c in constrained)
    assert together == alone


def _arguments(call: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    return arguments


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_forced_tool_calls_parse_against_the_schema(
    client: openai.OpenAI, tool_choice: Any
) -> None:
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=80,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls and all(call.id.startswith("call_") for call in calls)
    first = calls[0]
    assert first.type == "function"
    if isinstance(tool_choice, dict):
        assert first.function.name == "get_weather"
    arguments = _arguments(first)
    if first.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"}
        assert arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert set(arguments) == {"city"}


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_streamed_tool_calls_reassemble_to_the_same_call(
    client: openai.OpenAI, tool_choice: Literal["named", "required"]
) -> None:
    choice: Any = (
        {"type": "function", "function": {"name": "get_weather"}}
        if tool_choice == "named"
        else "required"
    )
    kwargs: dict[str, Any] = dict(
        model="capitals",
        messages=WEATHER_QUESTION,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        temperature=0,
        max_tokens=80,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls or []
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for fragment in delta.tool_calls or []:
            call = calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += fragment.id or ""
            assert fragment.function is not None
            call["name"] += fragment.function.name or ""
            call["arguments"] += fragment.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (w.function.name, _arguments(w)) for w in whole
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_a_tool_result_turn_continues_the_chat(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": '{"temperature": 21, "sky": "sunny"}',
        },
    ]
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    choice = answer.choices[0]
    assert choice.message.tool_calls in (None, [])
    assert choice.message.content and answer.usage is not None
    # the result reached the prompt: without it the prompt is shorter
    shorter = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages[:1],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=1,
    )
    assert (
        shorter.usage is not None and answer.usage.prompt_tokens > shorter.usage.prompt_tokens + 20
    )


def test_chat_logprobs_equal_the_models_own(client: openai.OpenAI, real_demo: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question = [{"role": "user", "content": "What is 17 times 3?"}]
    answer = client.chat.completions.create(
        model=MODEL_NAME,
        messages=question,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=5,
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert answer.usage is not None and len(entries) == answer.usage.completion_tokens
    tokenizer = AutoTokenizer.from_pretrained(str(real_demo.base))
    model = AutoModelForCausalLM.from_pretrained(str(real_demo.base), dtype=torch.float32)
    text = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for entry, logits, token in zip(
        entries, out.logits, out.sequences[0, len(prompt) :], strict=True
    ):
        reference = logits[0].float().log_softmax(-1)
        assert entry.token == tokenizer.decode([int(token)])
        assert entry.logprob == pytest.approx(float(reference[token]), abs=2e-3)
        tops = entry.top_logprobs
        assert len(tops) == 5 and tops[0].token == entry.token  # greedy: the top-1
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert all(t.logprob <= 0 for t in tops)
        assert entry.bytes == list(entry.token.encode())


def test_streamed_and_completion_logprobs(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(
        model="pirate",
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    entries: list[Any] = []
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            entries += (
                choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            )
    assert usage is not None and len(entries) == usage.completion_tokens
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in entries)

    completion = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3
    )
    completed = completion.choices[0]
    assert completed.logprobs is not None and completion.usage is not None
    tokens = completed.logprobs.tokens or []
    assert len(tokens) == completion.usage.completion_tokens
    assert "".join(tokens) == completed.text
    assert completed.logprobs.text_offset == [
        sum(len(t) for t in tokens[:i]) for i in range(len(tokens))
    ]
    for token, top in zip(tokens, completed.logprobs.top_logprobs or [], strict=True):
        assert top is not None and len(top) == 3 and max(top, key=top.__getitem__) == token
