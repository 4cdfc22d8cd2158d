"""Constrained decoding and logprobs inside both engines, on tiny random models.

A random model left free writes noise; constrained, whatever it writes must parse and validate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from tests.engine.test_continuous import generate_alone, reference_model
from tests.engine.tiny import TinyFamily, collect, quiet_peft, request, run, text_of, token_ids
from tuneserve.engine.base import Engine
from tuneserve.engine.continuous import ContinuousBatchingEngine
from tuneserve.engine.simple import PeftBatchEngine
from tuneserve.engine.types import Constraint, GenerationRequest


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a closed object: a random model adds keys

    name: str = Field(max_length=6)
    count: int = Field(ge=0, le=99)
    tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)


SCHEMA = Constraint("json_schema", json.dumps(Item.model_json_schema()))
PROMPT = [5, 17, 33, 2, 90, 41]


@pytest.fixture(params=["continuous", "simple"])
def engine(request: pytest.FixtureRequest, tiny_llama: TinyFamily) -> Iterator[Engine]:
    served = tiny_llama.served()
    started: Engine = (
        ContinuousBatchingEngine(served, max_num_seqs=8)
        if request.param == "continuous"
        else PeftBatchEngine(served, max_batch_size=8)
    )
    started.start()
    yield started
    started.shutdown()


def generate(engine: Engine, *requests: GenerationRequest) -> list[Any]:
    async def body() -> list[Any]:
        streams = [engine.submit(r) for r in requests]
        return [await collect(s) for s in streams]

    return run(body)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_for_base_and_adapters(
    engine: Engine, temperature: float
) -> None:
    requests = [
        request(
            PROMPT,
            adapter,
            f"r{i}",
            max_tokens=120,
            temperature=temperature,
            seed=i,
            constraint=SCHEMA,
        )
        for i, adapter in enumerate([None, "alpha", "beta", None])
    ]
    for deltas in generate(engine, *requests):
        assert deltas[-1].finish_reason == "stop"
        Item.model_validate_json(text_of(deltas))


def test_regex_and_choice_constraints(engine: Engine) -> None:
    regex = request(
        PROMPT, None, "regex", max_tokens=40, constraint=Constraint("regex", r"[a-c]{3}-\d{2}")
    )
    choice = Constraint("choice", json.dumps(["red", "green", "blue"]))
    chosen = request(PROMPT, "gamma", "choice", max_tokens=40, temperature=1.0, constraint=choice)
    first, second = generate(engine, regex, chosen)
    assert first[-1].finish_reason == "stop"
    text = text_of(first)
    assert len(text) == 6 and text[:3].strip("abc") == "" and text[3] == "-" and text[4:].isdigit()
    assert text_of(second) in ("red", "green", "blue")


def test_free_rows_beside_a_constrained_row_get_the_tokens_they_get_alone(
    engine: Engine, tiny_llama: TinyFamily
) -> None:
    free = [
        request(PROMPT[:n], adapter, f"free{n}", max_tokens=10)
        for n, adapter in ((6, None), (4, "alpha"), (5, "beta"))
    ]
    constrained = request(PROMPT, "alpha", "json", max_tokens=60, constraint=SCHEMA)
    results = generate(engine, free[0], constrained, free[1], free[2])
    for req, deltas in zip(free, [results[0], *results[2:]], strict=True):
        model = reference_model(tiny_llama, req.adapter)
        assert token_ids(deltas) == generate_alone(model, req.prompt_ids, 10)
    Item.model_validate_json(text_of(results[1]))


def test_logprobs_equal_the_models_own_distribution(engine: Engine, tiny_llama: TinyFamily) -> None:
    asked, silent = generate(
        engine,
        request(PROMPT, "beta", "lp", max_tokens=6, logprobs=3),
        request(PROMPT, "beta", "plain", max_tokens=6),
    )
    assert all(d.logprobs is None for d in silent)
    entries = [lp for d in asked for lp in d.logprobs or []]
    generated = token_ids(asked)
    assert len(entries) == len(generated) == asked[-1].completion_tokens
    model = reference_model(tiny_llama, "beta")
    ids = torch.tensor([PROMPT + generated])
    with torch.inference_mode(), quiet_peft():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]  # [T, V]
    reference = logits.float().log_softmax(-1)
    for step, entry in enumerate(entries):
        assert entry.token_id == generated[step] == entry.top[0][0]  # greedy: top-1
        assert entry.logprob == pytest.approx(float(reference[step, entry.token_id]), abs=1e-4)
        top_ids = [t for t, _ in entry.top]
        assert top_ids == reference[step].topk(3).indices.tolist()
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
