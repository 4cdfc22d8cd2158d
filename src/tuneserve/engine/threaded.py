"""What every engine that runs the model on its own thread shares: the thread's life, the
checks at submit, the live adapter set, and the condition the event loop side and the thread
meet on.

A subclass says how a submitted request is queued (`_enqueue`, called under `_cond`), what a
cancel from the event loop does (`_on_cancel`), what the thread does (`_loop`, which returns
once `_stopping` is set and calls `_run_commands()` between steps) and how requests left at
shutdown are ended (`_cancel_everything`).

Adapter changes touch the model, so they run on the engine thread between steps, never during
a forward: `_call(fn)` queues `fn` as a command and waits for the thread to run it. The live
set `_adapters` is replaced, never mutated (copy-on-write, only by a command that succeeded),
so any thread reads a consistent dict without a lock.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from tuneserve.engine import openmp
from tuneserve.engine.base import Engine, RequestStream
from tuneserve.engine.stream import QueueRequestStream
from tuneserve.engine.types import GenerationRequest
from tuneserve.errors import EngineError, UnknownAdapterError
from tuneserve.models.adapters import BaseLayers, check_against_base
from tuneserve.models.types import AdapterSpec, LoadedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ThreadedEngine(Engine):
    def __init__(self, served: LoadedModel) -> None:
        self.served = served
        # Read before a subclass wraps the model, and never again: validations run on other
        # threads while the engine thread may be rewrapping layers.
        self._base_layers = BaseLayers.of(served.model)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._adapters: dict[str, AdapterSpec] = dict(served.adapters)
        self._commands: collections.deque[tuple[Callable[[], Any], Future[Any]]] = (
            collections.deque()
        )
        self._commands_closed = False  # the thread has ended: nobody would run a command

    def start(self) -> None:
        if self._stopping:
            raise EngineError("the engine was shut down; build a new one")
        if self._thread is not None and self._thread.is_alive():
            return
        openmp.release_thread_team()  # whoever built the engine keeps no idle team (openmp.py)
        self._thread = threading.Thread(target=self._run, name="tuneserve-engine", daemon=True)
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
    def adapters(self) -> dict[str, AdapterSpec]:
        return dict(self._adapters)

    @property
    def vocab_size(self) -> int:
        # the config's size, which may exceed the tokenizer's (padded embeddings)
        size = getattr(getattr(self.served.model, "config", None), "vocab_size", None)
        return int(size) if size else len(self.served.tokenizer)

    def validate_adapter(self, spec: AdapterSpec) -> None:
        check_against_base(spec, self._base_layers)

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def submit(self, request: GenerationRequest) -> RequestStream:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise UnknownAdapterError(request.adapter, self.adapter_names)
        if self._stopping:
            raise EngineError("the engine is shut down and accepts no more requests")
        stream = QueueRequestStream(request.request_id, on_cancel=self._on_cancel)
        with self._cond:
            self._enqueue(request, stream)
            self._cond.notify()
        return stream

    def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise UnknownAdapterError(name, self.adapter_names)
        self._call(lambda: self._remove(name))

    def _remove(self, name: str) -> None:
        if name not in self._adapters:  # another command removed it since the caller looked
            raise UnknownAdapterError(name, self.adapter_names)
        self._remove_adapter(name)
        self._adapters = {k: v for k, v in self._adapters.items() if k != name}
        logger.info("adapter %r unloaded", name)

    @staticmethod
    def _unloaded(name: str, request_id: str) -> str:
        """Why a request that had not started yet ends when its adapter is removed."""
        return f"adapter {name!r} was unloaded before request {request_id} started"

    # -- commands: run on the engine thread between steps -------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread at its next safe point and return its result.

        Before the thread starts there is no step to wait for: `fn` runs here, holding `_cond`
        so that a thread started meanwhile waits for it. Raises what `fn` raises.
        """
        if threading.current_thread() is self._thread:
            return self._command_mode(fn)
        with self._cond:
            if self._stopping or self._commands_closed:
                raise EngineError("the engine is shut down; its adapters can no longer change")
            if self._thread is None:
                return self._command_mode(fn)
            future: Future[T] = Future()
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def _run_commands(self) -> None:
        """Run the queued commands (engine thread only, never while a forward runs)."""
        while True:
            with self._cond:
                if not self._commands:
                    return
                fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = self._command_mode(fn)
            except BaseException as exc:
                future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                future.set_result(result)

    @staticmethod
    def _command_mode(fn: Callable[[], T]) -> T:
        # A command builds state that outlives the step (adapter weights, wrapped layers):
        # plain tensors, not inference tensors (in-place updates later would be refused), and
        # nothing recorded for autograd.
        with torch.inference_mode(False), torch.no_grad():
            return fn()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                self._commands_closed = True
                left = list(self._commands)
                self._commands.clear()
            for _, future in left:
                if future.set_running_or_notify_cancel():
                    future.set_exception(
                        EngineError("the engine stopped before it could change its adapters")
                    )

    @abc.abstractmethod
    def _remove_adapter(self, name: str) -> None:
        """Take `name` (served) out of the model and end its requests that have not started
        (a command: engine thread, or before it starts); `_adapters` is updated after."""

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
