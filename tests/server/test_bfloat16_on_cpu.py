"""`--dtype bfloat16` on a CPU, through the API: the demo's memorised answers, base and both
adapters, asked together (steps of many tokens: bfloat16 products where the CPU has them) and
one at a time (decode steps of one token: the bfloat16 GEMV)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import torch

from tests.conftest import TEST_ENGINE
from tests.server.conftest import chat_messages
from tuneserve.models.demo import ADAPTER_EXAMPLES, BASE_EXAMPLES

QUESTIONS = [
    *[(None, q, a) for q, a in BASE_EXAMPLES[:3]],
    *[(name, q, a) for name in ("capitals", "pirate") for q, a in ADAPTER_EXAMPLES[name][:3]],
]


@pytest.fixture(scope="module")
def bf16_server(demo_server_factory: Any) -> Any:
    server = demo_server_factory(ui=False, dtype="bfloat16", device="cpu")
    yield server
    server.stop()


def test_the_demo_answers_as_trained_in_bfloat16(bf16_server: Any, base_id: str) -> None:
    def ask(item: tuple[str | None, Any, str]) -> str:
        adapter, messages, _ = item
        with openai.OpenAI(base_url=bf16_server.api_url, api_key="x", max_retries=0) as client:
            result = client.chat.completions.create(
                model=adapter or base_id, messages=chat_messages(messages), temperature=0
            )
        return result.choices[0].message.content or ""

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    alone = [ask(item) for item in QUESTIONS]
    truths = [answer for _, _, answer in QUESTIONS]
    assert together == truths
    assert alone == truths
    engine = bf16_server.app.state.generation.engine
    if TEST_ENGINE == "continuous":  # bfloat16 weights and keys, float32 arithmetic around them
        assert next(engine.model.parameters()).dtype == torch.float32
        assert engine.cache.keys[0].dtype == torch.bfloat16
    else:  # the simple engine serves the model as loaded
        assert next(engine.model.parameters()).dtype == torch.bfloat16
