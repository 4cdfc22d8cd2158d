"""`merge_streams` and `collect_choices` (server/streaming.py) over scripted sources: no
server, no engine. Each source is an async generator whose steps wait on events the test
sets, so the order of arrival is the test's choice, not the scheduler's; each records when
its `finally` ran and when its cleanup (which awaits, as the engine cancel and the metrics
do) was over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import pytest

from tuneserve.engine.types import StreamDelta, TokenLogprob
from tuneserve.errors import EngineError
from tuneserve.server import streaming
from tuneserve.server.streaming import collect_choices, merge_streams

T = TypeVar("T")
WAIT_S = 5.0  # a bound on every wait: a broken merge fails the test instead of hanging it

Step = str | StreamDelta | asyncio.Event | BaseException


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(body(), WAIT_S)

    return asyncio.run(bounded())


class Source:
    """One choice: yields its text steps (and StreamDelta steps as given), waits at an Event
    step until it is set, raises an exception step."""

    def __init__(self, name: str, steps: list[Step], log: list[str]) -> None:
        self.name = name
        self.steps = steps
        self.log = log
        self.cleaned = False

    async def stream(self) -> AsyncGenerator[StreamDelta, None]:
        self.log.append(f"{self.name} started")
        try:
            for step in self.steps:
                if isinstance(step, asyncio.Event):
                    await step.wait()
                elif isinstance(step, BaseException):
                    raise step
                elif isinstance(step, StreamDelta):
                    yield step
                else:
                    yield StreamDelta(text=step)
            self.log.append(f"{self.name} ended")
        finally:
            self.log.append(f"{self.name} closed")
            await asyncio.sleep(0.01)  # cleanup that awaits, like the engine cancel
            self.cleaned = True


def texts(items: list[tuple[int, StreamDelta]]) -> list[tuple[int, str]]:
    return [(index, delta.text) for index, delta in items]


def test_deltas_come_in_arrival_order_tagged_with_their_choice() -> None:
    async def body() -> list[tuple[int, StreamDelta]]:
        gates = [asyncio.Event() for _ in range(5)]
        log: list[str] = []
        sources = [
            Source("a", [gates[1], "a1", gates[3], "a2"], log),
            Source("b", [gates[0], "b1", gates[2], "b2"], log),
            Source("c", [gates[4], "c1"], log),
        ]
        got: list[tuple[int, StreamDelta]] = []
        gates[0].set()
        async with aclosing(merge_streams([s.stream() for s in sources])) as merged:
            async for item in merged:
                got.append(item)
                if len(got) < len(gates):
                    gates[len(got)].set()  # let the next one in the planned order go
        return got

    assert texts(run(body)) == [(1, "b1"), (0, "a1"), (1, "b2"), (0, "a2"), (2, "c1")]


def test_a_choice_delivers_its_deltas_in_its_own_order_even_in_a_burst() -> None:
    async def body() -> list[tuple[int, StreamDelta]]:
        log: list[str] = []
        words = [f"w{i}" for i in range(50)]
        sources = [Source("a", list(words), log), Source("b", list(words), log)]
        async with aclosing(merge_streams([s.stream() for s in sources])) as merged:
            return [item async for item in merged]

    got = texts(run(body))
    assert len(got) == 100
    for index in (0, 1):
        assert [text for i, text in got if i == index] == [f"w{i}" for i in range(50)]


def test_no_streams_end_at_once() -> None:
    async def body() -> list[tuple[int, StreamDelta]]:
        async with aclosing(merge_streams([])) as merged:
            return [item async for item in merged]

    assert run(body) == []


def test_a_choice_that_ends_early_leaves_the_others_running() -> None:
    log: list[str] = []

    async def body() -> list[tuple[int, StreamDelta]]:
        a_done = asyncio.Event()
        short = Source("a", ["a1"], log)
        long = Source("b", ["b1", a_done, "b2", "b3"], log)

        async def short_then_signal() -> AsyncGenerator[StreamDelta, None]:
            async with aclosing(short.stream()) as stream:
                async for delta in stream:
                    yield delta
            a_done.set()

        async with aclosing(merge_streams([short_then_signal(), long.stream()])) as merged:
            return [item async for item in merged]

    got = texts(run(body))
    assert got[2:] == [(1, "b2"), (1, "b3")]  # b went on after a had ended
    assert sorted(got[:2]) == [(0, "a1"), (1, "b1")]
    assert "a ended" in log and "b ended" in log


def test_an_error_raises_after_what_came_before_it_and_closes_the_other_choices() -> None:
    log: list[str] = []
    boom = EngineError("device lost")
    sources: list[Source] = []

    async def body() -> tuple[list[tuple[int, StreamDelta]], BaseException | None]:
        fail = asyncio.Event()
        never = asyncio.Event()
        sources.extend(
            [
                Source("a", ["a1", fail, boom, "a2"], log),
                Source("b", ["b1", never, "b2"], log),
                Source("c", ["c1"], log),  # ends on its own before the error
            ]
        )
        got: list[tuple[int, StreamDelta]] = []
        try:
            async with aclosing(merge_streams([s.stream() for s in sources])) as merged:
                async for item in merged:
                    got.append(item)
                    if len(got) == 3:
                        fail.set()
        except EngineError as exc:
            return got, exc
        return got, None

    got, error = run(body)
    assert error is boom  # the source's own exception, not a wrapper
    assert sorted(texts(got)) == [(0, "a1"), (1, "b1"), (2, "c1")]
    assert "a2" not in {d.text for _, d in got}
    # b was waiting for a delta that will never come: it was closed, its cleanup done,
    # before the error reached us
    assert "b closed" in log and "b ended" not in log
    assert all(s.cleaned for s in sources)


def test_a_source_that_handles_its_own_failure_ends_only_itself() -> None:
    """What the UI does (ui.ChatHandlers._side_stream): a side's failure becomes that side's
    message; merge_streams only sees the side end, and the other sides go on."""
    log: list[str] = []
    failures: list[str] = []

    async def body() -> list[tuple[int, StreamDelta]]:
        failed = asyncio.Event()
        bad = Source("a", ["a1", EngineError("refused")], log)
        good = Source("b", ["b1", failed, "b2"], log)

        async def guarded(source: Source) -> AsyncGenerator[StreamDelta, None]:
            try:
                async with aclosing(source.stream()) as stream:
                    async for delta in stream:
                        yield delta
            except EngineError as exc:
                failures.append(str(exc))
                failed.set()

        async with aclosing(merge_streams([guarded(bad), guarded(good)])) as merged:
            return [item async for item in merged]

    got = texts(run(body))
    assert failures == ["refused"]
    assert got[-1] == (1, "b2") and sorted(got[:2]) == [(0, "a1"), (1, "b1")]


def test_closing_the_merged_stream_closes_every_source_and_waits_for_their_cleanup() -> None:
    log: list[str] = []
    sources: list[Source] = []

    async def body() -> list[tuple[int, StreamDelta]]:
        never = asyncio.Event()
        sources.extend(
            [Source(name, [f"{name}1", never, f"{name}2"], log) for name in ("a", "b", "c")]
        )
        merged = merge_streams([s.stream() for s in sources])
        first = [await anext(merged)]
        await merged.aclose()  # as `aclosing` does when a consumer stops reading
        assert all(s.cleaned for s in sources), log  # done before aclose returned
        return first

    assert len(run(body)) == 1
    assert {f"{s} closed" for s in "abc"} <= set(log)
    assert not any(line.endswith("ended") for line in log)


def test_a_consumer_cancelled_by_anyio_still_waits_for_the_sources_cleanup() -> None:
    """sse-starlette cancels the task reading our stream through an anyio cancel scope when the
    client goes away; that scope keeps cancelling until the task exits, so the shielded wait in
    merge_streams is what lets each choice finish its cleanup (engine cancel, metrics)."""
    log: list[str] = []
    sources: list[Source] = []

    async def body() -> bool:
        never = asyncio.Event()
        reading = asyncio.Event()
        sources.extend([Source(name, [f"{name}1", never], log) for name in ("a", "b")])
        cleaned_when_merged_closed: list[bool] = []

        async def consume() -> None:
            try:
                async with aclosing(merge_streams([s.stream() for s in sources])) as merged:
                    async for _ in merged:
                        reading.set()
            finally:
                cleaned_when_merged_closed.append(all(s.cleaned for s in sources))

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await reading.wait()
            group.cancel_scope.cancel()
        return cleaned_when_merged_closed == [True]

    assert run(body), log
    assert {"a closed", "b closed"} <= set(log)


def test_a_cleanup_that_hangs_holds_the_close_only_for_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streaming, "_CANCEL_GRACE_S", 0.05)
    log: list[str] = []

    async def stuck() -> AsyncGenerator[StreamDelta, None]:
        try:
            yield StreamDelta(text="x")
            await asyncio.Event().wait()
        finally:
            log.append("stuck closing")
            await asyncio.Event().wait()  # a cleanup that never ends by itself

    async def body() -> float:
        loop = asyncio.get_running_loop()
        merged = merge_streams([stuck()])
        await anext(merged)
        start = loop.time()
        await merged.aclose()
        return loop.time() - start

    elapsed = run(body)
    assert log == ["stuck closing"]
    assert 0.04 <= elapsed < 2.0


def test_an_unstarted_merge_starts_no_source() -> None:
    log: list[str] = []

    async def body() -> None:
        source = Source("a", ["a1"], log)
        merged = merge_streams([source.stream()])
        await merged.aclose()

    run(body)
    assert log == []


# -- collect_choices -------------------------------------------------------------------------
def lp(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id=token_id, logprob=-0.5)


def test_collect_choices_gives_each_choice_its_text_final_delta_and_logprobs() -> None:
    log: list[str] = []

    async def body() -> list[tuple[str, StreamDelta, list[TokenLogprob]]]:
        second_first = asyncio.Event()
        a = Source(
            "a",
            [
                second_first,
                StreamDelta(text="Hel", logprobs=[lp(11)]),
                StreamDelta(text="lo", logprobs=[lp(12)], finish_reason="stop"),
            ],
            log,
        )
        b = Source(
            "b",
            [
                StreamDelta(text="Hi", logprobs=[lp(21)]),
                StreamDelta(text=""),  # a held-back stop match: no text, no logprobs
                StreamDelta(text="!", finish_reason="length", completion_tokens=3),
            ],
            log,
        )

        async def b_then_release() -> AsyncGenerator[StreamDelta, None]:
            async with aclosing(b.stream()) as stream:
                async for delta in stream:
                    yield delta
            second_first.set()

        return await collect_choices([a.stream(), b_then_release()])

    (text_a, final_a, lps_a), (text_b, final_b, lps_b) = run(body)  # choice order, not arrival
    assert (text_a, final_a.finish_reason, [e.token_id for e in lps_a]) == (
        "Hello",
        "stop",
        [11, 12],
    )
    assert (text_b, final_b.finish_reason, final_b.completion_tokens) == ("Hi!", "length", 3)
    assert [e.token_id for e in lps_b] == [21]


def test_collect_choices_refuses_a_stream_that_ends_without_a_finish_reason() -> None:
    async def body() -> Any:
        return await collect_choices([Source("a", ["unfinished"], []).stream()])

    with pytest.raises(AssertionError, match="without a finish_reason"):
        run(body)


def test_collect_choices_raises_the_first_error() -> None:
    log: list[str] = []

    async def body() -> Any:
        never = asyncio.Event()
        return await collect_choices(
            [
                Source("a", ["a1", ValueError("bad choice")], log).stream(),
                Source("b", ["b1", never], log).stream(),
            ]
        )

    with pytest.raises(ValueError, match="bad choice"):
        run(body)
    assert "b closed" in log


def test_a_source_cancelled_on_its_own_fails_the_merge_instead_of_hanging_it() -> None:
    """A source that raises CancelledError itself (not because the merge closed it: its
    engine went away under it, say) is an error of that choice; the others are closed."""
    log: list[str] = []
    hold = asyncio.Event()
    gone = Source("a", ["a1", asyncio.CancelledError()], log)
    other = Source("b", ["b1", hold, "b2"], log)

    async def body() -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        with pytest.raises(EngineError, match="choice 0: its generation was cancelled"):
            async with aclosing(merge_streams([gone.stream(), other.stream()])) as merged:
                async for index, delta in merged:
                    seen.append((index, delta.text))
        return seen

    seen = run(body)
    assert (0, "a1") in seen and (1, "b1") in seen and (1, "b2") not in seen
    assert "b closed" in log  # the other choice was cancelled and cleaned up


def test_a_plain_async_iterator_is_read_without_being_closed() -> None:
    """`merge_streams` takes any async iterator; only generators have `aclose`."""

    class Plain:
        def __init__(self) -> None:
            self.items = [StreamDelta(text="x"), StreamDelta(text="y", finish_reason="stop")]

        def __aiter__(self) -> Plain:
            return self

        async def __anext__(self) -> StreamDelta:
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

    async def body() -> list[tuple[int, str]]:
        async with aclosing(merge_streams([Plain()])) as merged:
            return [(index, delta.text) async for index, delta in merged]

    assert run(body) == [(0, "x"), (0, "y")]
