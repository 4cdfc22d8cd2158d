"""QueueRequestStream: deltas from another thread, cancel, errors."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from tests.engine.tiny import run
from tuneserve.engine.stream import QueueRequestStream
from tuneserve.engine.types import StreamDelta
from tuneserve.errors import EngineError


def push_from_thread(stream: QueueRequestStream, deltas: list[StreamDelta]) -> threading.Thread:
    def push_all() -> None:
        for delta in deltas:
            stream.push(delta)

    thread = threading.Thread(target=push_all)
    thread.start()
    return thread


def test_deltas_from_another_thread_arrive_in_order_and_end_at_finish() -> None:
    async def body() -> list[str]:
        stream = QueueRequestStream("r1")
        deltas = [StreamDelta(text=str(i), completion_tokens=i + 1) for i in range(50)]
        deltas.append(StreamDelta(text="!", finish_reason="length", completion_tokens=51))
        # Anything after the finishing delta is not part of the stream.
        deltas.append(StreamDelta(text="late"))
        thread = push_from_thread(stream, deltas)
        got = [d.text async for d in stream]
        thread.join()
        return got

    assert run(body) == [str(i) for i in range(50)] + ["!"]


def test_cancel_wakes_a_waiting_reader_and_calls_back_once() -> None:
    calls: list[str] = []

    async def body() -> list[StreamDelta]:
        stream = QueueRequestStream("r2", on_cancel=calls.append)
        stream.push(StreamDelta(text="a"))

        async def read() -> list[StreamDelta]:
            return [d async for d in stream]

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.05)  # the reader got "a" and now waits for more
        stream.cancel()
        stream.cancel()
        got = await reader
        # The engine's final delta after the cancel is dropped.
        stream.push(StreamDelta(text="", finish_reason="cancelled"))
        assert [d async for d in stream] == []
        assert stream.cancelled
        return got

    assert [d.text for d in run(body)] == ["a"]
    assert calls == ["r2"]


def test_cancel_after_finish_does_not_call_back() -> None:
    calls: list[str] = []

    async def body() -> None:
        stream = QueueRequestStream("r3", on_cancel=calls.append)
        stream.push(StreamDelta(text="x", finish_reason="stop"))
        assert [d.text async for d in stream] == ["x"]
        stream.cancel()

    run(body)
    assert calls == []


def test_fail_raises_engine_error_in_the_reader() -> None:
    async def body() -> list[str]:
        stream = QueueRequestStream("r4")
        stream.push(StreamDelta(text="partial"))
        stream.fail("generation failed: RuntimeError: boom")
        got: list[str] = []
        with pytest.raises(EngineError, match="boom"):
            async for delta in stream:
                got.append(delta.text)
        return got

    assert run(body) == ["partial"]


def test_push_after_the_loop_closed_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    async def make() -> QueueRequestStream:
        return QueueRequestStream("r5")

    stream = asyncio.run(make())
    with caplog.at_level(logging.DEBUG, logger="tuneserve.engine.stream"):
        stream.push(StreamDelta(text="nobody listens"))  # no exception from the engine thread
        stream.fail("nobody listens either")
    dropped = [r for r in caplog.records if "dropping an item" in r.getMessage()]
    assert len(dropped) == 2 and all("r5" in r.getMessage() for r in dropped)
