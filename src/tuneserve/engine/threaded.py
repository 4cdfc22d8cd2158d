"""What every engine that runs the model on its own thread shares: the thread's life, the
checks at submit, and the condition the event loop side and the thread meet on.

A subclass says how a submitted request is queued (`_enqueue`, called under `_cond`), what a
cancel from the event loop does (`_on_cancel`), what the thread does (`_loop`, which returns
once `_stopping` is set) and how requests left at shutdown are ended (`_cancel_everything`).
"""

from __future__ import annotations

import abc
import logging
import threading

from tuneserve.engine.base import Engine, RequestStream
from tuneserve.engine.stream import QueueRequestStream
from tuneserve.engine.types import GenerationRequest
from tuneserve.errors import EngineError, UnknownAdapterError
from tuneserve.models.types import ServedModel

logger = logging.getLogger(__name__)


class ThreadedEngine(Engine):
    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._stopping:
            raise EngineError("the engine was shut down; build a new one")
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._loop, name="tuneserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Ending its requests from here would race the thread still using them.
                logger.warning("engine thread did not stop within %.0f s", timeout)
                return
        self._cancel_everything()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def adapter_names(self) -> list[str]:
        return list(self.served.adapters)

    def submit(self, request: GenerationRequest) -> RequestStream:
        if request.adapter is not None and request.adapter not in self.served.adapters:
            raise UnknownAdapterError(request.adapter, self.adapter_names)
        if self._stopping:
            raise EngineError("the engine is shut down and accepts no more requests")
        stream = QueueRequestStream(request.request_id, on_cancel=self._on_cancel)
        with self._cond:
            self._enqueue(request, stream)
            self._cond.notify()
        return stream

    @abc.abstractmethod
    def _enqueue(self, request: GenerationRequest, stream: QueueRequestStream) -> None:
        """Queue a request for the thread; called with `_cond` held."""

    @abc.abstractmethod
    def _on_cancel(self, request_id: str) -> None:
        """A stream was cancelled on the event loop side."""

    @abc.abstractmethod
    def _loop(self) -> None:
        """The engine thread; returns once `_stopping` is set."""

    @abc.abstractmethod
    def _cancel_everything(self) -> None:
        """End every request still queued or running with "cancelled" (thread stopped)."""
