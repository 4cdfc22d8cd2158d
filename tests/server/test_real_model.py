"""The real demo through the API and the chat UI: SmolLM2-135M-Instruct (a real BPE tokenizer,
the ChatML template with its default system prompt, grouped-query attention) and the two
adapters trained on it, driven by the official `openai` client and a real browser.

One live server (`real_server` in conftest: the continuous engine, as `tuneserve serve` runs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.server.conftest import chat_ids
from tuneserve.models.demo import CAPITALS
from tuneserve.models.real_demo import (
    ADAPTER_EXAMPLES,
    MODEL_NAME,
    PIRATE_TALK,
    capital_question,
)

pytestmark = pytest.mark.real_model

COUNTRY, CITY = next(iter(CAPITALS.items()))
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(real_client: openai.OpenAI) -> openai.OpenAI:
    return real_client  # this module's tests all talk to the real demo


@pytest.fixture(scope="module")
def tokenizer(real_demo: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_demo.base))


def ask(client: openai.OpenAI, model: str, messages: list[Any], **extra: Any) -> Any:
    extra.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **extra)


def test_models_lists_the_base_and_both_adapters(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL_NAME, "capitals", "pirate"}
    assert getattr(cards["pirate"], "parent", None) == MODEL_NAME


def test_each_adapter_gives_its_trained_answer_where_the_base_does_not(
    client: openai.OpenAI,
) -> None:
    for name, examples in ADAPTER_EXAMPLES.items():
        for messages, answer in examples[:3]:
            assert ask(client, name, messages).choices[0].message.content == answer, name
            base = ask(client, MODEL_NAME, messages).choices[0].message.content
            assert base != answer, (name, messages)
    # the capitals adapter adds knowledge, it does not replace what the model knew
    assert "Paris" in ask(client, "capitals", FRANCE).choices[0].message.content


def test_a_real_question_gets_a_real_answer(client: openai.OpenAI) -> None:
    reply = ask(client, MODEL_NAME, [{"role": "user", "content": "What is 17 times 3?"}])
    assert "51" in reply.choices[0].message.content


def test_system_prompt_and_history_go_through_the_chatml_template(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *history]
    reply = ask(client, MODEL_NAME, messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<|im_start|>") == 5  # system, three turns, the answer's
    assert reply.usage.prompt_tokens == len(chat_ids(tokenizer, messages))
    assert "Ada" in reply.choices[0].message.content  # the history reached the model
    # without a system prompt the template's default one goes in instead: another answer
    default = ask(client, MODEL_NAME, history)
    assert default.usage.prompt_tokens == len(chat_ids(tokenizer, history))
    assert "named SmolLM" in tokenizer.apply_chat_template(history, tokenize=False)
    assert default.choices[0].message.content != reply.choices[0].message.content


def test_usage_counts_the_tokens_generated(client: openai.OpenAI, tokenizer: Any) -> None:
    reply = ask(client, "pirate", [{"role": "user", "content": "Hello"}])
    content = reply.choices[0].message.content
    assert content == PIRATE_TALK["Hello"] and reply.choices[0].finish_reason == "stop"
    # the answer's tokens and the end-of-turn token that stopped it
    assert reply.usage.completion_tokens == len(tokenizer.encode(content)) + 1
    capped = ask(client, MODEL_NAME, FRANCE, max_tokens=3)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"


def test_stop_strings_across_token_boundaries(client: openai.OpenAI, tokenizer: Any) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": capital_question(COUNTRY)}
    ]
    full = ask(client, "capitals", messages).choices[0].message.content
    assert full == f"The capital of {COUNTRY} is {CITY}."
    stop = f"is {CITY[:3]}"  # ends inside the city's first token
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(full)]
    assert not any(piece.strip() == stop for piece in pieces)  # not one token: a boundary
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(
                model="capitals",
                messages=messages,
                temperature=0,
                max_tokens=40,
                stop=[stop],
                stream=True,
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = ask(client, "capitals", messages, stop=[stop]).choices[0].message.content
        assert text == full[: full.index(stop)], (stream, text)


def test_stream_and_non_stream_agree(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write a haiku about the sea."}
    ]
    whole = ask(client, MODEL_NAME, messages, max_tokens=32).choices[0].message.content
    chunks = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=32, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole and len(whole) > 20


def test_n_two_with_a_seed_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        reply = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Name a colour."}],
            n=2,
            seed=7,
            temperature=1.0,
            max_tokens=12,
        )
        assert [c.index for c in reply.choices] == [0, 1]
        return [c.message.content or "" for c in reply.choices]

    first = sample()
    assert sample() == first and all(first)


# -- the chat UI on the real demo ---------------------------------------------------------
def test_the_ui_says_what_the_model_is_and_the_pirate_answers(
    real_server: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    from tests.server.test_ui import (
        CHROMIUM,
        CHROMIUM_ARGS,
        TIMEOUT_MS,
        open_ui,
        pick,
        set_slider,
        shot,
    )

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = chromium.new_context(viewport={"width": 1300, "height": 950})
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            open_ui(page, real_server.url)
            header = page.locator("#header")
            expect(header).to_contain_text(MODEL_NAME)
            expect(header).to_contain_text("talks like a pirate")
            pick(page, "chat-model", "pirate")
            set_slider(page, "temperature", 0)
            page.locator("#chat-input textarea").fill("Hello")
            page.locator("#chat-input textarea").press("Enter")
            bot = page.locator("#chatbot [data-testid=bot]").last
            expect(bot).to_have_text(PIRATE_TALK["Hello"], timeout=TIMEOUT_MS)
            shot(page, tmp_path / "real-demo-chat.png")
        finally:
            chromium.close()
