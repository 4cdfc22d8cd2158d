"""The KV cache as a memory budget: blocks follow the tokens in use, a full budget makes
requests wait or preempts the newest (recomputed later, same tokens), and a budget that cannot
hold one max-length sequence is refused at startup, naming the flag."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from tests.engine.test_continuous import engine_for, generate_alone, prompt, reference_model
from tests.engine.tiny import TinyFamily, collect, request, run, token_ids
from tuneserve.engine.continuous import ContinuousBatchingEngine
from tuneserve.engine.kv_cache import KVCacheShape
from tuneserve.errors import EngineError


def block_bytes(family: TinyFamily) -> int:
    """Bytes of one KV block of the tiny model in float32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family.base)
    return KVCacheShape.from_config(config, num_blocks=0).bytes_per_block(torch.float32)


def track_running(engine: ContinuousBatchingEngine) -> list[int]:
    """Record how many sequences run at each step."""
    seen: list[int] = []
    schedule = engine.scheduler.schedule

    def spy() -> Any:
        chunks = schedule()
        seen.append(len(engine.scheduler.running))
        return chunks

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return seen


def generate_all(
    engine: ContinuousBatchingEngine,
    prompts: list[list[int]],
    adapters: list[str | None],
    max_tokens: int,
    timeout: float = 60.0,
) -> list[list[Any]]:
    """Submit every prompt at once (greedy, EOS ignored); the deltas of each."""

    async def body() -> list[list[Any]]:
        streams = [
            engine.submit(request(p, a, request_id=f"r{i}", max_tokens=max_tokens, ignore_eos=True))
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
        ]
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    return run(body, timeout=timeout)


def test_a_budget_below_one_max_length_sequence_is_refused_naming_the_flag(
    tiny_llama: TinyFamily,
) -> None:
    # max_model_len 512 = 32 blocks of 16; give it 20
    with pytest.raises(EngineError) as err:
        ContinuousBatchingEngine(tiny_llama.served(), kv_cache_memory=20 * block_bytes(tiny_llama))
    message = str(err.value)
    assert "--kv-cache-memory" in message and "--max-model-len" in message
    assert "max_model_len=512" in message and "holds 320 tokens" in message


def test_short_sequences_share_a_budget_that_holds_one_long_one(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    # room for exactly one 512-token sequence: slots x max length would run one at a time
    engine = engine_for(
        tiny_llama.served(), max_num_seqs=8, kv_cache_memory=32 * block_bytes(tiny_llama)
    )
    engines.append(engine)
    assert engine.cache.num_blocks == 32
    seen = track_running(engine)
    prompts = [prompt(10 + i, seed=400 + i) for i in range(6)]

    results = generate_all(engine, prompts, [None] * len(prompts), max_tokens=8)
    assert max(seen) == 6  # all six ran together, two blocks each
    for ids, deltas in zip(prompts, results, strict=True):
        assert token_ids(deltas) == generate_alone(reference_model(tiny_llama, None), ids, 8)
    assert engine.cache.num_free == engine.cache.num_blocks


def test_a_full_budget_preempts_the_newest_and_every_answer_is_unchanged(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    # four sequences growing to 150 tokens (10 blocks each) in a budget of 32 blocks
    engine = engine_for(
        tiny_llama.served(), max_num_seqs=4, kv_cache_memory=32 * block_bytes(tiny_llama)
    )
    engines.append(engine)
    seen = track_running(engine)
    prompts = [prompt(60, seed=500 + i) for i in range(4)]
    adapters = [None, "alpha", "beta", None]

    results = generate_all(engine, prompts, adapters, max_tokens=90, timeout=120)
    assert max(seen) == 4 and engine.scheduler.num_preemptions >= 1
    for ids, adapter, deltas in zip(prompts, adapters, results, strict=True):
        assert len(token_ids(deltas)) == 90
        assert token_ids(deltas) == generate_alone(reference_model(tiny_llama, adapter), ids, 90)
    assert engine.cache.num_free == engine.cache.num_blocks
