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

Adapters can change while the engine serves (`add_adapter`, `remove_adapter`): those calls
block (they read weights files), so asyncio code runs them with `asyncio.to_thread`.

The server asks the engine, never its model, what depends on the model (`vocab_size`,
`validate_adapter`, `adapter_usage`): a backend that runs its model elsewhere (another
process, a compiled path) implements this class and registers in engine/registry.py.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from tuneserve.engine.types import AdapterUsage, EngineStats, GenerationRequest, StreamDelta
from tuneserve.models.types import AdapterSpec


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
    def adapters(self) -> dict[str, AdapterSpec]:
        """A copy of the live adapter set (name -> spec)."""

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this engine serves now."""
        return list(self.adapters)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids a prompt or logit_bias may hold are 0 .. vocab_size - 1."""

    @abc.abstractmethod
    def validate_adapter(self, spec: AdapterSpec) -> None:
        """Raise AdapterError with the reason unless this engine's model can serve `spec`
        (read by models/adapters.py `read_adapter_spec`). Blocking, never waits for a step."""

    @abc.abstractmethod
    def add_adapter(self, spec: AdapterSpec) -> None:
        """Serve `spec` under `spec.name`; a served name is replaced atomically.

        Requests already running finish on the old weights; requests admitted after this
        returns use the new ones. Blocking (reads the weights file): call it off the event loop.
        Raises AdapterError when this engine cannot serve it (the old version keeps serving),
        EngineError when the engine is shut down.
        """

    @abc.abstractmethod
    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`.

        Later `submit()` raises UnknownAdapterError; running requests finish on its weights;
        requests still waiting to start end with an error naming the adapter. Raises
        UnknownAdapterError when `name` is not served. Blocking, like `add_adapter`.
        """

    @abc.abstractmethod
    def adapter_usage(self) -> dict[str, AdapterUsage]:
        """name -> usage, for every served adapter (cheap; never waits for a step)."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; must be called from a running asyncio event loop.

        Raises UnknownAdapterError when request.adapter is not served.
        """

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...
