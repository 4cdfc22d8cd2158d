"""Clients for the API tests: the `openai` client and raw httpx, on the live demo server."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam


@pytest.fixture(scope="session")
def client(demo_server: Any) -> Iterator[openai.OpenAI]:
    # No retries: a test must see the first answer, and 5xx would otherwise be retried.
    with openai.OpenAI(
        base_url=demo_server.api_url, api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="session")
def real_server(real_demo: Any) -> Iterator[Any]:
    """The real demo (SmolLM2 and its two adapters) live, on the continuous engine."""
    from tests.conftest import start_live_server
    from tuneserve.engine.registry import create_engine
    from tuneserve.models.loader import load_served_model
    from tuneserve.models.real_demo import ABOUT, MODEL_NAME
    from tuneserve.server.app import create_app

    served = load_served_model(
        str(real_demo.base),
        dict(real_demo.adapters),
        dtype="float32",
        device="cpu",
        served_model_name=MODEL_NAME,
    )
    engine = create_engine("continuous", served, max_num_seqs=8)
    live = start_live_server(create_app(served, engine, about=ABOUT))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def real_client(real_server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=real_server.api_url, api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="session")
def http(demo_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def base_id(client: openai.OpenAI) -> str:
    return next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)


@pytest.fixture(scope="session")
def tokenizer(demo_paths: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_paths.base))


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids a correct server computes: the whole chat through the template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_messages(messages: list[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    """The demo's chats (plain role/content dicts) as the `openai` client's message type."""
    return cast("list[ChatCompletionMessageParam]", messages)


def metric_value(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus text (0 when absent); labels must all match."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
