"""PeftBatchEngine end to end on tiny random models with random LoRA adapters.

The oracle is plain transformers (+ PEFT) `generate` of one request alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from tests.engine.tiny import (
    CORPUS,
    TinyFamily,
    collect,
    request,
    run,
    text_of,
    token_ids,
    wait_until,
)
from tuneserve.engine.simple import PeftBatchEngine
from tuneserve.engine.types import StreamDelta
from tuneserve.errors import EngineError, UnknownAdapterError


@contextmanager
def engine_for(
    tiny: TinyFamily, adapters: Sequence[str] | None = None, **kwargs: Any
) -> Iterator[PeftBatchEngine]:
    engine = PeftBatchEngine(tiny.served(adapters), **kwargs)
    try:
        yield engine
    finally:
        engine.shutdown()


def reference_greedy(
    tiny: TinyFamily, adapter: str | None, prompt: Sequence[int], n: int
) -> list[int]:
    model = tiny.reference(adapter)
    ids = torch.tensor([list(prompt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=[tiny.tokenizer.eos_token_id],
        pad_token_id=tiny.tokenizer.pad_token_id,
    )
    return [int(t) for t in out[0, len(prompt) :]]


def prompts(tiny: TinyFamily, n: int) -> list[list[int]]:
    """Prompts of clearly different lengths (1 token up to a whole sentence)."""
    texts = ["Hi", *CORPUS[:n]]
    return [tiny.tokenizer.encode(text) for text in texts[:n]]


async def run_all(engine: PeftBatchEngine, requests: Sequence[Any]) -> list[list[StreamDelta]]:
    """Submit everything first, then start: the requests form one batch (up to the limit)."""
    streams = [engine.submit(r) for r in requests]
    engine.start()
    return list(await asyncio.gather(*(collect(s) for s in streams)))


def test_mixed_adapter_batch_matches_generate_alone(tiny: TinyFamily) -> None:
    adapters = [None, "alpha", "beta", "gamma", "alpha", None]
    batch = [
        request(p, a, request_id=f"r{i}", max_tokens=8)
        for i, (p, a) in enumerate(zip(prompts(tiny, len(adapters)), adapters, strict=True))
    ]
    with engine_for(tiny) as engine:
        results = run(lambda: run_all(engine, batch))
    for req, deltas in zip(batch, results, strict=True):
        expected = reference_greedy(tiny, req.adapter, req.prompt_ids, 8)
        assert token_ids(deltas) == expected, f"adapter {req.adapter}"
        assert deltas[-1].finish_reason in ("length", "stop")
        assert deltas[-1].completion_tokens == len(expected)
        assert all(d.prompt_tokens == len(req.prompt_ids) for d in deltas)
        assert text_of(deltas) == tiny.tokenizer.decode(expected, skip_special_tokens=True)


def test_adapters_do_not_cross_talk(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("The quick brown fox")
    names = [None, "alpha", "beta", "gamma"]

    def one(adapter: str | None, i: int) -> Any:
        return request(prompt, adapter, request_id=f"{adapter}-{i}", max_tokens=6, ignore_eos=True)

    with engine_for(tiny_llama) as engine:
        together = run(lambda: run_all(engine, [one(a, 0) for a in names]))

        async def each_alone() -> list[list[int]]:
            return [token_ids(await collect(engine.submit(one(a, 1)))) for a in names]

        alone = run(each_alone)
    assert [token_ids(d) for d in together] == alone
    assert len({tuple(t) for t in alone}) == len(names), "every adapter should change the output"


def test_bare_model_without_adapters(tiny_qwen2: TinyFamily) -> None:
    prompt = tiny_qwen2.tokenizer.encode("Stop strings end a request")
    with engine_for(tiny_qwen2, adapters=[]) as engine:
        assert engine.adapter_names == []
        (deltas,) = run(lambda: run_all(engine, [request(prompt, max_tokens=7)]))
    assert token_ids(deltas) == reference_greedy(tiny_qwen2, None, prompt, 7)


def test_more_requests_than_the_batch_limit(tiny_llama: TinyFamily) -> None:
    adapters = ["beta", None, "gamma", "alpha", "beta"]
    batch = [
        request(p, a, request_id=f"r{i}", max_tokens=5, ignore_eos=True)
        for i, (p, a) in enumerate(zip(prompts(tiny_llama, 5), adapters, strict=True))
    ]
    with engine_for(tiny_llama, max_batch_size=2) as engine:
        results = run(lambda: run_all(engine, batch))
    for req, deltas in zip(batch, results, strict=True):
        assert token_ids(deltas) == reference_greedy(tiny_llama, req.adapter, req.prompt_ids, 5)


def test_seeded_sampling_is_reproducible(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("hello there")

    def hot(seed: int, i: int) -> Any:
        return request(
            prompt,
            "alpha",
            request_id=f"s{seed}-{i}",
            max_tokens=12,
            temperature=1.5,
            seed=seed,
            ignore_eos=True,
        )

    with engine_for(tiny_llama) as engine:
        first = run(lambda: run_all(engine, [hot(7, 0), hot(7, 1), hot(8, 2)]))

        async def again() -> list[StreamDelta]:
            return await collect(engine.submit(hot(7, 3)))

        later = run(again)
    a, b, c = (token_ids(d) for d in first)
    assert a == b == token_ids(later)
    assert a != c


def test_stop_string_cuts_the_text(tiny_llama: TinyFamily) -> None:
    tokenizer = tiny_llama.tokenizer
    prompt = tokenizer.encode("User: hello there!")
    with engine_for(tiny_llama, adapters=[]) as engine:
        (free,) = run(lambda: run_all(engine, [request(prompt, max_tokens=16, ignore_eos=True)]))
        full = text_of(free)
        # A stop string taken from what the model says (two clean characters past the start).
        start = next(
            i
            for i in range(1, len(full) - 1)
            if full[i : i + 2].isprintable() and "\ufffd" not in full[i : i + 2]
        )
        stop = full[start : start + 2]
        cut = full.find(stop)
        ids = token_ids(free)
        needed = next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))

        async def stopped() -> list[StreamDelta]:
            stream = engine.submit(
                request(prompt, max_tokens=16, ignore_eos=True, stop=("NEVER", stop))
            )
            return await collect(stream)

        deltas = run(stopped)
    assert text_of(deltas) == full[:cut]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == needed
    assert token_ids(deltas) == ids[:needed]


def test_max_tokens_gives_length_and_exact_counts(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("count")
    with engine_for(tiny_llama) as engine:
        (deltas,) = run(
            lambda: run_all(engine, [request(prompt, "gamma", max_tokens=5, ignore_eos=True)])
        )
    assert [d.completion_tokens for d in deltas] == [1, 2, 3, 4, 5]
    assert [len(d.token_ids) for d in deltas] == [1] * 5
    assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]
    assert all(d.prompt_tokens == len(prompt) for d in deltas)


def test_eos_min_tokens_and_ignore_eos(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("The quick brown fox")
    greedy = reference_greedy(tiny_llama, "beta", prompt, 8)
    # Declare a later greedy token (new at its step) the EOS: generation must stop there.
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    eos = greedy[k]
    served = tiny_llama.served()
    served.eos_token_ids = (eos,)
    engine = PeftBatchEngine(served)
    try:

        async def body() -> list[list[StreamDelta]]:
            return await run_all(
                engine,
                [
                    request(prompt, "beta", request_id="eos", max_tokens=8),
                    request(prompt, "beta", request_id="min", max_tokens=k + 4, min_tokens=k + 2),
                    request(prompt, "beta", request_id="ign", max_tokens=8, ignore_eos=True),
                ],
            )

        at_eos, with_min, ignoring = run(body)
    finally:
        engine.shutdown()
    assert token_ids(at_eos) == greedy[: k + 1]
    assert at_eos[-1].finish_reason == "stop" and at_eos[-1].completion_tokens == k + 1
    # EOS is masked for the first k + 1 tokens, so the row runs past where it stopped above.
    assert token_ids(with_min)[:k] == greedy[:k]
    assert eos not in token_ids(with_min)[: k + 1]
    assert with_min[-1].completion_tokens >= k + 2
    assert token_ids(ignoring) == greedy and ignoring[-1].finish_reason == "length"


def test_cancel_mid_stream_frees_the_row_and_the_engine_keeps_serving(
    tiny_llama: TinyFamily,
) -> None:
    prompt = tiny_llama.tokenizer.encode("hello")
    with engine_for(tiny_llama) as engine:

        async def body() -> list[StreamDelta]:
            engine.start()
            # Far more tokens than could finish during this test: only the cancel ends it.
            stream = engine.submit(request(prompt, "alpha", max_tokens=100_000, ignore_eos=True))
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    stream.cancel()
            assert seen == 3
            await wait_until(lambda: engine.stats().running == 0, timeout=10)
            return await collect(
                engine.submit(request(prompt, "beta", request_id="next", max_tokens=4))
            )

        deltas = run(body)
        assert engine.is_running
    assert deltas[-1].finish_reason in ("length", "stop")


def test_cancel_while_waiting_never_runs(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("hello")
    with engine_for(tiny_llama) as engine:

        async def body() -> list[StreamDelta]:
            doomed = engine.submit(request(prompt, request_id="doomed"))
            kept = engine.submit(request(prompt, request_id="kept", max_tokens=3))
            assert engine.stats().waiting == 2
            doomed.cancel()
            assert engine.stats().waiting == 1
            assert await collect(doomed) == []
            engine.start()
            return await collect(kept)

        assert run(body)[-1].completion_tokens == 3


def test_a_request_arriving_mid_batch_runs_in_the_next_batch(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("hello")
    events: list[tuple[str, str | None]] = []

    async def consume(stream: Any) -> None:
        async for delta in stream:
            events.append((stream.request_id, delta.finish_reason))

    with engine_for(tiny_llama) as engine:

        async def body() -> None:
            engine.start()
            long = engine.submit(
                request(prompt, "alpha", request_id="long", max_tokens=20, ignore_eos=True)
            )
            task = asyncio.create_task(consume(long))
            await wait_until(lambda: len(events) >= 1)
            late = engine.submit(
                request(prompt, "beta", request_id="late", max_tokens=3, ignore_eos=True)
            )
            assert engine.stats().waiting == 1 and engine.stats().running == 1
            await asyncio.gather(task, consume(late))

        run(body)
    long_end = events.index(("long", "length"))
    late_first = next(i for i, (rid, _) in enumerate(events) if rid == "late")
    assert late_first > long_end  # static batching: it waited for the running batch
    assert events[-1] == ("late", "length")


def test_unknown_adapter_raises(tiny_llama: TinyFamily) -> None:
    with engine_for(tiny_llama, adapters=["alpha"]) as engine:

        async def body() -> None:
            with pytest.raises(UnknownAdapterError, match="'nope'.*alpha"):
                engine.submit(request([5, 6], "nope"))

        run(body)


def test_a_failing_forward_fails_its_batch_and_the_engine_keeps_serving(
    tiny_llama: TinyFamily,
) -> None:
    served = tiny_llama.served()
    poison = 13  # a token id that makes the model raise (a fault in the model, not the engine)

    def explode(_module: Any, args: tuple[Any, ...]) -> None:
        if (args[0] == poison).any():
            raise RuntimeError("simulated device failure")

    served.model.get_input_embeddings().register_forward_pre_hook(explode)
    engine = PeftBatchEngine(served)
    try:

        async def body() -> list[StreamDelta]:
            engine.start()
            with pytest.raises(EngineError, match="simulated device failure"):
                await collect(engine.submit(request([5, poison, 6], "alpha", request_id="bad")))
            assert engine.is_running
            return await collect(
                engine.submit(
                    request([5, 6], "alpha", request_id="good", max_tokens=3, ignore_eos=True)
                )
            )

        deltas = run(body)
    finally:
        engine.shutdown()
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3


def test_bad_prompt_fails_alone(tiny_llama: TinyFamily) -> None:
    with engine_for(tiny_llama) as engine:

        async def body() -> list[StreamDelta]:
            bad = engine.submit(request([5, 10_000], request_id="bad"))
            good = engine.submit(request([5, 6], request_id="good", max_tokens=3, ignore_eos=True))
            engine.start()
            with pytest.raises(EngineError, match="10000 is outside the vocabulary"):
                await collect(bad)
            return await collect(good)

        assert run(body)[-1].completion_tokens == 3


def test_shutdown_cancels_running_and_waiting_requests(tiny_llama: TinyFamily) -> None:
    prompt = tiny_llama.tokenizer.encode("hello")
    engine = PeftBatchEngine(tiny_llama.served())

    async def body() -> tuple[list[StreamDelta], list[StreamDelta]]:
        engine.start()
        assert engine.is_running
        running = engine.submit(
            request(prompt, request_id="running", max_tokens=100_000, ignore_eos=True)
        )
        first = await anext(aiter(running))
        waiting = engine.submit(request(prompt, request_id="waiting"))
        engine.shutdown()
        return [first, *await collect(running)], await collect(waiting)

    running, waiting = run(body)
    assert not engine.is_running
    assert running[-1].finish_reason == "cancelled"
    assert running[-1].completion_tokens == len(token_ids(running))
    assert [d.finish_reason for d in waiting] == ["cancelled"]
    with pytest.raises(EngineError):
        run(lambda: _submit_async(engine, prompt))


async def _submit_async(engine: PeftBatchEngine, prompt: list[int]) -> None:
    engine.submit(request(prompt))
