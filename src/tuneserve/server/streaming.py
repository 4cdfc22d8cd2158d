"""Plumbing between engine deltas and an HTTP response whose client may go away.

- `merge_streams` runs the n choices of a request concurrently and yields their deltas in
  arrival order; closing it cancels every choice still generating.
- `sse_response` sends events as Server-Sent Events (`data: ...`, then `data: [DONE]`).
  sse-starlette watches for the client's disconnect and cancels the task iterating our
  generator; every layer closes its inner generator explicitly (`aclosing`) so the engine
  requests are cancelled at once, not whenever the garbage collector finalizes them.
- `run_until_disconnect` gives a non-streaming request the same guarantee.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from typing import TypeVar

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from tuneserve.engine.types import StreamDelta, TokenLogprob
from tuneserve.errors import EngineError
from tuneserve.server.error_handlers import as_api_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DONE = object()
# How long closing a merged stream waits for its choices to run their cleanup.
_CANCEL_GRACE_S = 10.0


async def collect_choices(
    streams: Sequence[AsyncIterator[StreamDelta]],
) -> list[tuple[str, StreamDelta, list[TokenLogprob]]]:
    """Run every choice to its end: (whole text, final delta, logprobs) per choice, in
    choice order."""
    texts: list[list[str]] = [[] for _ in streams]
    logprobs: list[list[TokenLogprob]] = [[] for _ in streams]
    finals: list[StreamDelta | None] = [None] * len(streams)
    async with aclosing(merge_streams(streams)) as merged:
        async for index, delta in merged:
            texts[index].append(delta.text)
            logprobs[index].extend(delta.logprobs or [])
            if delta.finish_reason is not None:
                finals[index] = delta
    results = []
    for parts, final, entries in zip(texts, finals, logprobs, strict=True):
        assert final is not None, "the engine ended a stream without a finish_reason"
        results.append(("".join(parts), final, entries))
    return results


async def merge_streams(
    streams: Sequence[AsyncIterator[StreamDelta]],
) -> AsyncGenerator[tuple[int, StreamDelta], None]:
    """Yield (choice index, delta) from all streams as they arrive; the first error raises."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamDelta]) -> None:
        try:
            try:
                async for delta in stream:
                    queue.put_nowait((index, delta))
            finally:
                close = getattr(stream, "aclose", None)  # a generator; a plain iterator has none
                if close is not None:
                    await close()
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        except asyncio.CancelledError:
            # ours (the merge is closing: nobody reads the queue any more), or the source's own
            # (say, its engine stopped under it): the consumer must not wait for this choice
            queue.put_nowait((index, EngineError(f"choice {index}: its generation was cancelled")))
            raise
        else:
            queue.put_nowait((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, StreamDelta)
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # Shielded: we may be here because our own task was cancelled (client gone), and
        # the choices' cleanup (engine cancel, metrics) must still run before we return.
        with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _sse_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    async with aclosing(events):  # type: ignore[type-var]
        try:
            async for data in events:
                yield data
        except Exception as exc:
            # Headers are sent: report in the stream, as OpenAI and vLLM do; the openai
            # client raises an APIError for a data event holding "error".
            yield as_api_error(exc).to_json()
    yield "[DONE]"


def sse_response(events: AsyncIterator[str]) -> EventSourceResponse:
    """An SSE response of JSON `events` followed by `[DONE]`."""
    return EventSourceResponse(_sse_events(events), sep="\n")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it if the client disconnects first (then the reply is moot).

    The body is already read when a route runs, so the next ASGI message can only be the
    disconnect (uvicorn also sends it once the response is complete, by which time we are done).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
        await asyncio.gather(task, return_exceptions=True)
    logger.info("client disconnected from %s; its generation was cancelled", request.url.path)
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
