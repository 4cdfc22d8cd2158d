"""The interface the server depends on; engines are swappable behind it.

Usage from asyncio code (the server, the UI):

    stream = engine.submit(GenerationRequest(...))   # on the event loop thread
    try:
        async for delta in stream:                    # StreamDelta, last one has finish_reason
            ...
    finally:
        stream.cancel()                               # no-op when already finished

Generation runs on the engine's own thread, never on the event loop, so one request
never blocks another. `cancel()` frees the request's resources at the engine's next step.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from tuneserve.engine.types import EngineStats, GenerationRequest, StreamDelta


class RequestStream(abc.ABC):
    """An async iterator over one request's deltas."""

    request_id: str

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[StreamDelta]: ...

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop generating for this request (idempotent)."""


class Engine(abc.ABC):
    @abc.abstractmethod
    def start(self) -> None:
        """Start the engine thread. Returns once the engine accepts work."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the thread; pending requests finish with finish_reason "cancelled"."""

    @property
    @abc.abstractmethod
    def is_running(self) -> bool:
        """True while the engine loop is alive (drives GET /ready)."""

    @property
    @abc.abstractmethod
    def adapter_names(self) -> list[str]:
        """Names of the adapters this engine can serve."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; must be called from a running asyncio event loop.

        Raises UnknownAdapterError when request.adapter is not served.
        """

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...
