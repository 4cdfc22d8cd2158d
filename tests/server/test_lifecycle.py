"""Graceful shutdown of a real `tuneserve serve` process: SIGTERM drains, nothing running is lost.

Every platform stops a replica with SIGTERM (Container Apps and Kubernetes on each revision
change and scale-in, the local provider on deploy): running streams must end with `[DONE]`,
`/ready` must say 503 at once, new requests get 503 with Retry-After, and a drain that would
outlast `--shutdown-timeout` ends there.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.test_cli import _env

BASE = "tuneserve-demo"
# per stream: long enough to still run through the checks made after SIGTERM (400 once all
# ended before them, on a faster CPU); the demo's context is 1024
TOKENS = 900


class Serve:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(demo_paths: Any, demo_cache: Path, tmp_path: Path) -> Iterator[Any]:
    """Start `tuneserve serve` (the demo, no UI) with extra flags; killed at the end."""
    started: list[Serve] = []

    def start(*flags: str) -> Serve:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        proc = subprocess.Popen(
            # the toy demo: these tests are about the process, not the model
            [sys.executable, "-m", "tuneserve", "serve", "--base", str(demo_paths.base)]
            + ["--served-model-name", BASE]
            + ["--port", str(port), "--no-ui", "--log-level", "warning", *flags],
            env=_env(),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        server = Serve(proc, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, server.log_text()
            try:
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in 120 s:\n{server.log_text()}")

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)


class Stream(threading.Thread):
    """One streamed chat completion read as raw SSE; records every data line and any error."""

    def __init__(self, url: str, max_tokens: int, first: threading.Barrier | None) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.first = url, max_tokens, first
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": BASE,
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        try:
            with httpx.stream(
                "POST", self.url + "/v1/chat/completions", json=body, timeout=120
            ) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    if not self.events and self.first is not None:
                        self.first.wait(timeout=60)
                    self.events.append(line.removeprefix("data:").strip())
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def usage(self) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event != "[DONE]" and (usage := json.loads(event).get("usage")):
                return dict(usage)
        return None


def start_streams(url: str, count: int, max_tokens: int) -> list[Stream]:
    """`count` streams, returned once every one has its first event (all are running)."""
    first = threading.Barrier(count + 1)
    streams = [Stream(url, max_tokens, first) for _ in range(count)]
    for stream in streams:
        stream.start()
    first.wait(timeout=60)
    return streams


def test_sigterm_drains_eight_streams_to_done(serve: Any) -> None:
    server = serve("--shutdown-timeout", "60")
    streams = start_streams(server.url, 8, max_tokens=TOKENS)
    # A connection opened just before the signal, whose request is still on its way: the drain
    # must answer it, not close it (a probe or a client would see a dropped connection).
    host, port = server.url.removeprefix("http://").split(":")
    early = socket.create_connection((host, int(port)), timeout=10)

    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)  # the drain has begun (it acts every 0.1 s)
    early.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    early_answer = early.recv(4096).decode("latin-1")
    early.close()
    ready = httpx.get(server.url + "/ready", timeout=5)
    refused = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=5,
    )
    # The streams were still running when the probe and the new request were answered.
    still_running = sum(not s.done for s in streams)

    for stream in streams:
        stream.join(timeout=120)
    code = server.proc.wait(timeout=60)
    exited_after = time.monotonic() - signalled

    assert early_answer.startswith("HTTP/1.1 503"), early_answer
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"].isdigit()
    assert refused.headers["connection"] == "close"
    assert refused.json()["error"]["type"] == "service_unavailable_error"
    assert still_running > 0, "the streams ended before the checks: make them longer"
    for stream in streams:
        assert stream.error is None, stream.error
        assert stream.done, stream.events[-3:]
        usage = stream.usage()
        assert usage is not None and usage["completion_tokens"] == TOKENS
    assert code == 0, server.log_text()
    assert exited_after < 60
    assert "drained in" in server.log_text()


@pytest.mark.parametrize("how", ["timeout", "second-ctrl-c"])
def test_a_drain_ends_at_the_timeout_or_a_second_ctrl_c(serve: Any, how: str) -> None:
    timeout = 4.0
    server = serve("--shutdown-timeout", str(timeout))
    # Far more tokens than fit in the timeout: only the timeout (or Ctrl+C) can end them (6
    # streams of 900 tokens once finished within it on the faster engine: 24 now)
    streams = start_streams(server.url, 24, max_tokens=900)

    if how == "timeout":
        server.proc.send_signal(signal.SIGTERM)
    else:
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert httpx.get(server.url + "/ready", timeout=5).status_code == 503
        server.proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    server.proc.wait(timeout=timeout + 30)
    took = time.monotonic() - signalled
    for stream in streams:
        stream.join(timeout=30)

    if how == "timeout":
        # the drain ends within the timeout (then the process exits: about a second here, which
        # the platforms' grace periods leave room for), not long before it
        assert timeout - 2.5 <= took <= timeout + 2.5, (took, server.log_text())
        assert "shutdown timeout" in server.log_text()
    else:
        # sooner than the drain would have ended (a loaded machine takes ~3 s to exit)
        assert took < timeout, (took, server.log_text())
    assert not any(s.done for s in streams), "they could not have finished: they were cut"


def test_the_chat_ui_generations_count_and_are_refused_while_draining(load_demo: Any) -> None:
    """The UI calls GenerationService in-process (no /v1 request to count): its generations
    keep the drain waiting, and new ones are refused with the drain's message."""
    import asyncio

    from tuneserve.engine.registry import create_engine
    from tuneserve.engine.types import SamplingParams
    from tuneserve.server.errors import ServiceUnavailableError
    from tuneserve.server.generation import GenerationService

    served = load_demo()
    engine = create_engine("continuous", served, max_num_seqs=2)
    service = GenerationService(engine, served)
    messages = [{"role": "user", "content": "Hello"}]
    params = SamplingParams(max_tokens=8, temperature=0.0)

    async def scenario() -> tuple[list[int], str]:
        seen = []
        async for _ in service.chat_stream(served.base_name, messages, params):
            seen.append(service.lifecycle.running)
            service.lifecycle.begin_drain()  # a SIGTERM mid-generation: it goes on
        seen.append(service.lifecycle.running)
        try:
            async for _ in service.chat_stream(served.base_name, messages, params):
                pass
        except ServiceUnavailableError as exc:
            return seen, exc.message
        return seen, "not refused"

    engine.start()
    try:
        seen, refused = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert seen[0] == 1 and seen[-1] == 0 and len(seen) > 2
    assert "shutting down" in refused
