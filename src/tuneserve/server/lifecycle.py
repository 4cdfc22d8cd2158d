"""Graceful shutdown: SIGTERM drains the server instead of cutting what runs.

Every platform we deploy to stops a replica with SIGTERM (Container Apps and Kubernetes on each
revision change and scale-in, the local provider on deploy and stop), then kills it after a
grace period. On the first SIGTERM (or Ctrl+C):

1. `/ready` answers 503 at once, so probes and proxies stop sending; the listener stays open,
   so probes still get an answer.
2. New generation requests (API and chat UI) get 503 with `Retry-After` and `Connection: close`,
   so a client retries on a fresh connection, which the platform routes to another replica.
   Idle keep-alive connections are closed; busy ones close after their response.
3. Running requests, streams included, finish; the process exits once none is left, or when
   `--shutdown-timeout` runs out (the rest is then cut), or at a second Ctrl+C.

What counts as running: every /v1 request until its response is fully sent (so a stream's
`[DONE]` goes out), and every generation the chat UI started.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from tuneserve.server.error_handlers import error_response
from tuneserve.server.errors import ServiceUnavailableError
from tuneserve.settings import DEFAULT_SHUTDOWN_TIMEOUT_S

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # long enough for a platform to route a retry elsewhere


class Lifecycle:
    """Whether the server is draining, and how much work is still running. Lives on the event
    loop's thread; the signal handler only flips `draining` (between two bytecodes of that same
    thread), so no lock is needed."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_started: float | None = None
        self.running = 0

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

    @property
    def idle(self) -> bool:
        return self.running == 0


def draining_error() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The server is shutting down (draining); retry: another replica will answer.",
        code="draining",
    )


class DrainMiddleware:
    """Counts running /v1 requests (until their last byte is sent) and refuses new ones while
    draining. Pure ASGI, so a stream is counted for its whole life, not until its first chunk."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _under(scope["path"], "/v1"):
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            response = error_response(
                draining_error(),
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        with self.lifecycle.track():
            await self.app(scope, receive, send)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT drains (see the module docstring) instead of
    closing the listener and cutting streams at once (sse-starlette ends every stream when
    uvicorn starts its shutdown)."""

    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.shutdown_timeout = shutdown_timeout
        self._connections_told = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler (which sse-starlette patches to end every stream at once), and
        # the signal is not re-raised after serve(): a finished drain exits with status 0.
        if not self.started or self.should_exit:
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        if not self.lifecycle.draining:
            self.lifecycle.begin_drain()
            logger.warning(
                "%s: draining: not ready; %d request(s) running may finish within %.0f s "
                "(Ctrl+C again to stop now)",
                signal.Signals(sig).name,
                self.lifecycle.running,
                self.shutdown_timeout,
            )
        elif sig == signal.SIGINT:
            logger.warning("stopping now: %d request(s) cut", self.lifecycle.running)
            self.should_exit = self.force_exit = True
        else:
            logger.info("%s again: still draining", signal.Signals(sig).name)

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.draining and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        if not self._connections_told:
            # Idle keep-alive connections close now; busy ones after their response. A client
            # (or the local provider's proxy) then reconnects, and reaches another replica.
            # Connections opened from now on are answered (probes: 503; new work: 503 and
            # Connection: close).
            for connection in list(self.server_state.connections):
                _shutdown_connection(connection)
            self._connections_told = True
        started = self.lifecycle.drain_started or time.monotonic()
        elapsed = time.monotonic() - started
        # Keep back a little of the budget for uvicorn's own shutdown and the engine's stop,
        # so the process is gone within shutdown_timeout (the platform's grace period).
        reserve = min(2.0, 0.2 * self.shutdown_timeout)
        if self.lifecycle.idle:
            logger.warning("drained in %.1f s; stopping", elapsed)
        elif elapsed >= self.shutdown_timeout - reserve:
            logger.warning(
                "shutdown timeout (%.0f s): cutting %d running request(s)",
                self.shutdown_timeout,
                self.lifecycle.running,
            )
        else:
            return
        # What is left are the chat UI's event streams (its generations are done or cut): a
        # few seconds let their last events out, within the budget. A float: uvicorn hands it
        # to asyncio.wait_for, though it annotates int (a whole second would break the budget).
        left = self.shutdown_timeout - elapsed
        graceful = max(0.1, min(3.0, left - reserve / 2))
        self.config.timeout_graceful_shutdown = graceful  # type: ignore[assignment]
        self.should_exit = True


def _shutdown_connection(connection: Any) -> None:
    """Close an idle keep-alive connection, or mark a busy one to close after its response.
    A connection with no request yet is left alone: it was just opened, its request (a probe,
    a new request to answer with 503) is on its way, and closing it would lose that."""
    if getattr(connection, "cycle", None) is None:
        return
    with contextlib.suppress(Exception):  # a connection closing under us is fine
        connection.shutdown()
