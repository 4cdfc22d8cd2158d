"""The bridge from an engine thread to asyncio: one request's deltas as an async iterator.

The stream is created on the event loop thread; the engine thread hands it deltas with
`push()` / `fail()`, which only schedule work on the loop (`call_soon_threadsafe`), so
neither side ever blocks the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from tuneserve.engine.base import RequestStream
from tuneserve.engine.types import StreamDelta
from tuneserve.errors import EngineError

logger = logging.getLogger(__name__)

_END: Final = object()  # wakes a waiting reader after cancel()
_Item = object  # StreamDelta | EngineError | _END


class QueueRequestStream(RequestStream):
    """Deltas pushed from any thread, read with `async for` on the loop that created it.

    The iterator ends after the delta carrying a finish_reason, or at once after
    `cancel()`. `fail()` makes the iterator raise EngineError.
    """

    def __init__(self, request_id: str, on_cancel: Callable[[str], None] | None = None) -> None:
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._cancelled = False
        self._done = False  # the iterator has ended; later items are ignored

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # -- engine thread side ------------------------------------------------------------
    def push(self, delta: StreamDelta) -> None:
        """Hand one delta to the reader. Safe from any thread."""
        self._send(delta)

    def fail(self, message: str) -> None:
        """End the stream with an error the reader sees as EngineError. Safe from any thread."""
        self._send(EngineError(message))

    def _send(self, item: _Item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            # The loop is closed: the reader is gone and nobody will read this.
            logger.debug("request %s: event loop closed, dropping an item", self.request_id)

    # -- event loop side ---------------------------------------------------------------
    def __aiter__(self) -> QueueRequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if self._done or item is _END:  # cancel() ran while we waited
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, EngineError):
            self._done = True
            raise item
        assert isinstance(item, StreamDelta)
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        if self._cancelled or self._done:
            self._cancelled = True
            return
        self._cancelled = True
        self._done = True
        if self._on_cancel is not None:
            self._on_cancel(self.request_id)
        self._send(_END)
