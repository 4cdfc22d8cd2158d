"""The OpenAI-compatible API, driven by the official `openai` client against a live server.

The demo model memorised its chats (tuneserve.models.demo): greedy decoding must reproduce
the recorded answers exactly, so these tests check real outputs, not shapes only.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import chat_ids, chat_messages
from tuneserve.models.demo import (
    ADAPTER_EXAMPLES,
    BASE_EXAMPLES,
    HISTORY_EXAMPLES,
    SORRY,
    SYSTEM_EXAMPLES,
)

GREEDY: dict[str, Any] = {"temperature": 0}
HELLO, HELLO_ANSWER = BASE_EXAMPLES[0]
CAPITAL, CAPITAL_ANSWER = ADAPTER_EXAMPLES["capitals"][0]
PIRATE_HELLO, PIRATE_ANSWER = ADAPTER_EXAMPLES["pirate"][0]


def answer(client: openai.OpenAI, model: str, messages: Any, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=messages, **GREEDY, **kwargs)


# -- /v1/models ----------------------------------------------------------------------------
def test_models_lists_the_base_then_each_adapter(
    client: openai.OpenAI, demo_paths: Any, base_id: str
) -> None:
    cards = client.models.list().data
    assert [c.id for c in cards] == [base_id, *sorted(demo_paths.adapters)]
    base, *adapters = cards
    assert base.object == "model" and base.owned_by == "tuneserve"
    assert base.model_extra is not None
    assert base.model_extra["root"] == str(demo_paths.base)
    assert base.model_extra["parent"] is None
    for card in adapters:
        assert card.model_extra is not None
        assert card.model_extra["parent"] == base_id
        assert card.model_extra["root"] == str(demo_paths.adapters[card.id])
        assert card.created == base.created > 0


# -- chat ------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages,expected", BASE_EXAMPLES[:3] + BASE_EXAMPLES[-1:])
def test_chat_base_answers(
    client: openai.OpenAI, base_id: str, messages: Any, expected: str
) -> None:
    result = answer(client, base_id, messages)
    assert result.object == "chat.completion"
    assert result.model == base_id
    assert result.id.startswith("chatcmpl-")
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == "stop"


def test_chat_history_matters(client: openai.OpenAI, base_id: str) -> None:
    with_history = next(ex for ex in HISTORY_EXAMPLES if len(ex[0]) == 3)
    alone = next(ex for ex in HISTORY_EXAMPLES if ex[1] == SORRY)
    assert answer(client, base_id, with_history[0]).choices[0].message.content == with_history[1]
    assert answer(client, base_id, alone[0]).choices[0].message.content == SORRY


def test_chat_system_prompt_matters(client: openai.OpenAI, base_id: str) -> None:
    messages, upper = SYSTEM_EXAMPLES[0]
    assert answer(client, base_id, messages).choices[0].message.content == upper
    without_system = [m for m in messages if m["role"] != "system"]
    assert answer(client, base_id, without_system).choices[0].message.content != upper


def test_chat_content_as_text_parts(client: openai.OpenAI, base_id: str) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": HELLO[0]["content"]}]}]
    assert answer(client, base_id, parts).choices[0].message.content == HELLO_ANSWER


def test_developer_role_is_a_system_prompt(client: openai.OpenAI, base_id: str) -> None:
    messages, upper = SYSTEM_EXAMPLES[0]
    developer = [{**m, "role": "developer"} if m["role"] == "system" else m for m in messages]
    assert answer(client, base_id, developer).choices[0].message.content == upper


def test_adapter_gives_its_trained_answer_and_the_base_does_not(
    client: openai.OpenAI, base_id: str
) -> None:
    assert answer(client, "capitals", CAPITAL).choices[0].message.content == CAPITAL_ANSWER
    assert answer(client, base_id, CAPITAL).choices[0].message.content == SORRY
    assert answer(client, "pirate", PIRATE_HELLO).choices[0].message.content == PIRATE_ANSWER
    assert answer(client, base_id, PIRATE_HELLO).choices[0].message.content == HELLO_ANSWER


def test_chat_stream_chunks(client: openai.OpenAI, base_id: str) -> None:
    stream = answer(client, base_id, HELLO, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.created for c in chunks} == {chunks[0].created}
    assert {c.model for c in chunks} == {base_id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in middle)
    assert text == HELLO_ANSWER
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens >= len(middle)
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens


def test_chat_stream_raw_sse(http: httpx.Client, base_id: str) -> None:
    body = {"model": base_id, "messages": HELLO, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.strip()]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == HELLO_ANSWER
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_chat_stream_adapter(client: openai.OpenAI) -> None:
    stream = answer(client, "capitals", CAPITAL, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == CAPITAL_ANSWER


def test_chat_n_choices(client: openai.OpenAI, base_id: str, tokenizer: Any) -> None:
    result = answer(client, base_id, HELLO, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert [c.message.content for c in result.choices] == [HELLO_ANSWER] * 2
    one = answer(client, base_id, HELLO).usage
    assert result.usage.prompt_tokens == one.prompt_tokens == len(chat_ids(tokenizer, HELLO))
    assert result.usage.completion_tokens == 2 * one.completion_tokens


def test_chat_n_choices_streamed(client: openai.OpenAI, base_id: str) -> None:
    stream = answer(client, base_id, HELLO, n=3, stream=True)
    texts = {0: "", 1: "", 2: ""}
    roles, finishes = [], []
    for chunk in stream:
        (choice,) = chunk.choices
        if choice.delta.role:
            roles.append(choice.index)
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes.append(choice.index)
    assert sorted(roles) == sorted(finishes) == [0, 1, 2]
    assert list(texts.values()) == [HELLO_ANSWER] * 3


def test_stop_sequence_is_cut_and_finishes_stop(client: openai.OpenAI, base_id: str) -> None:
    assert "help" in HELLO_ANSWER
    result = answer(client, base_id, HELLO, stop=["help", "never seen"])
    (choice,) = result.choices
    assert choice.message.content == HELLO_ANSWER.split("help")[0]
    assert choice.finish_reason == "stop"
    streamed = answer(client, base_id, HELLO, stop="help", stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == HELLO_ANSWER.split("help")[0]


def test_max_tokens_finishes_length_with_exact_usage(
    client: openai.OpenAI, base_id: str, tokenizer: Any
) -> None:
    for kwargs in (
        {"max_tokens": 3},
        {"max_completion_tokens": 3},
        {"max_tokens": 50, "max_completion_tokens": 3},
    ):
        result = answer(client, base_id, HELLO, **kwargs)
        assert result.choices[0].finish_reason == "length"
        assert result.usage.completion_tokens == 3
        assert result.usage.prompt_tokens == len(chat_ids(tokenizer, HELLO))
        assert result.usage.total_tokens == result.usage.prompt_tokens + 3


def test_usage_counts_the_whole_conversation(
    client: openai.OpenAI, base_id: str, tokenizer: Any
) -> None:
    messages, _ = next(ex for ex in HISTORY_EXAMPLES if len(ex[0]) == 3)
    result = answer(client, base_id, messages, max_tokens=7, extra_body={"ignore_eos": True})
    assert result.usage.prompt_tokens == len(chat_ids(tokenizer, messages))
    assert result.usage.completion_tokens == 7
    assert result.choices[0].finish_reason == "length"


def test_ignore_eos_and_min_tokens(client: openai.OpenAI, base_id: str) -> None:
    normal = answer(client, base_id, HELLO).usage.completion_tokens
    longer = answer(client, base_id, HELLO, max_tokens=normal + 5, extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == normal + 5
    assert longer.choices[0].message.content.startswith(HELLO_ANSWER)
    at_least = answer(client, base_id, HELLO, extra_body={"min_tokens": normal + 2})
    assert at_least.usage.completion_tokens >= normal + 2


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, base_id: str) -> None:
    def sample(**kwargs: Any) -> list[str]:
        result = client.chat.completions.create(
            model=base_id,
            messages=chat_messages(HELLO),
            temperature=1.0,
            max_tokens=12,
            extra_body={"ignore_eos": True, "top_k": -1, "repetition_penalty": 1.0},
            **kwargs,
        )
        return [c.message.content or "" for c in result.choices]

    first = sample(seed=11, n=2)
    assert sample(seed=11, n=2) == first
    # choice i of a seeded request uses seed + i
    assert sample(seed=12) == first[1:]


def test_concurrent_requests_for_different_adapters(client: openai.OpenAI, base_id: str) -> None:
    jobs = [
        ("capitals", CAPITAL, CAPITAL_ANSWER),
        ("pirate", PIRATE_HELLO, PIRATE_ANSWER),
        (base_id, HELLO, HELLO_ANSWER),
        ("capitals", ADAPTER_EXAMPLES["capitals"][1][0], ADAPTER_EXAMPLES["capitals"][1][1]),
        (base_id, CAPITAL, SORRY),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: answer(client, j[0], j[1]), jobs))
    assert [r.choices[0].message.content for r in results] == [j[2] for j in jobs]
    assert [r.model for r in results] == [j[0] for j in jobs]


def test_concurrent_streams_async_client(demo_server: Any, base_id: str) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=demo_server.api_url, api_key="unused", max_retries=0
        ) as aclient:

            async def one(model: str, messages: Any) -> str:
                stream = await aclient.chat.completions.create(
                    model=model, messages=messages, temperature=0, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            return list(
                await asyncio.gather(
                    one("pirate", PIRATE_HELLO), one("capitals", CAPITAL), one(base_id, HELLO)
                )
            )

    assert asyncio.run(main()) == [PIRATE_ANSWER, CAPITAL_ANSWER, HELLO_ANSWER]


# -- completions -----------------------------------------------------------------------------
def test_completion_token_ids_equal_the_chat(
    client: openai.OpenAI, base_id: str, tokenizer: Any
) -> None:
    ids = chat_ids(tokenizer, HELLO)
    result = client.completions.create(model=base_id, prompt=ids, max_tokens=40, **GREEDY)
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    (choice,) = result.choices
    assert choice.text == HELLO_ANSWER and choice.finish_reason == "stop"
    assert result.usage.prompt_tokens == len(ids)


def test_completion_string_prompt(client: openai.OpenAI, base_id: str, tokenizer: Any) -> None:
    prompt = "The capital of Veloria"
    by_text = client.completions.create(model=base_id, prompt=prompt, max_tokens=6, **GREEDY)
    ids = list(tokenizer.encode(prompt))
    by_ids = client.completions.create(model=base_id, prompt=ids, max_tokens=6, **GREEDY)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    assert by_text.usage.completion_tokens == by_ids.usage.completion_tokens <= 6


def test_completion_default_max_tokens_is_16(client: openai.OpenAI, base_id: str) -> None:
    result = client.completions.create(
        model=base_id, prompt="Hello", extra_body={"ignore_eos": True}, **GREEDY
    )
    assert result.usage.completion_tokens == 16
    assert result.choices[0].finish_reason == "length"


def test_completion_list_of_prompts_times_n(client: openai.OpenAI, tokenizer: Any) -> None:
    prompts = [chat_ids(tokenizer, CAPITAL), chat_ids(tokenizer, PIRATE_HELLO)]
    result = client.completions.create(
        model="capitals", prompt=prompts, n=2, max_tokens=40, **GREEDY
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    texts = [c.text for c in result.choices]
    assert texts[0] == texts[1] == CAPITAL_ANSWER
    assert texts[2] == texts[3]
    assert result.usage.prompt_tokens == sum(len(p) for p in prompts)  # each prompt once


def test_completion_list_of_strings_and_echo(client: openai.OpenAI, base_id: str) -> None:
    prompts = ["Hello there", "Who"]
    result = client.completions.create(
        model=base_id, prompt=prompts, max_tokens=4, echo=True, **GREEDY
    )
    assert [c.index for c in result.choices] == [0, 1]
    for prompt, choice in zip(prompts, result.choices, strict=True):
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)


def test_completion_stream(client: openai.OpenAI, base_id: str, tokenizer: Any) -> None:
    ids = chat_ids(tokenizer, HELLO)
    stream = client.completions.create(
        model=base_id,
        prompt=[ids, ids],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id}
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert texts == {0: HELLO_ANSWER, 1: HELLO_ANSWER}
    assert finish == {0: "stop", 1: "stop"}
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens == 2 * len(ids)


def test_completion_stream_echo(client: openai.OpenAI, base_id: str) -> None:
    stream = client.completions.create(
        model=base_id, prompt="Hello", max_tokens=3, echo=True, stream=True, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].text == "Hello"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# -- ops endpoints ---------------------------------------------------------------------------
def test_request_id_is_echoed_or_made(http: httpx.Client) -> None:
    given = http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = http.get("/v1/models")
    assert len(made.headers["x-request-id"]) >= 16


def test_docs_and_openapi_stay_available(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"} <= set(
        spec["paths"]
    )
    assert http.get("/docs").status_code == 200
