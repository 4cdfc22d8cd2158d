"""The load generator's arrivals (benchmarks/client.py) against a live streaming server.

The server here is a stand-in that streams one word every GAP seconds: what is under test is
when the clients send, which no model's speed should blur.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from benchmarks.client import completion_body, run_closed_loop
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tests.conftest import LiveServer, start_live_server

GAP = 0.05  # seconds between two streamed words
TOKENS = 8
CLIENTS = 4


class Recorder:
    def __init__(self) -> None:
        self.arrivals: list[float] = []  # when each request reached the server, in order
        self.first_stream: list[float] = []  # when the first request's words were sent

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> StreamingResponse:
            body = await request.json()
            first = not self.arrivals
            self.arrivals.append(time.monotonic())

            async def events() -> AsyncIterator[str]:
                for _ in range(body["max_tokens"]):
                    await asyncio.sleep(GAP)
                    if first:
                        self.first_stream.append(time.monotonic())
                    yield "data: " + json.dumps({"choices": [{"text": " w"}]}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, LiveServer]]:
    rec = Recorder()
    server = start_live_server(rec.app())
    yield rec, server
    server.stop()


def run(server: LiveServer, staggered: bool) -> None:
    body = completion_body("m", "hello", TOKENS)
    done = run_closed_loop(
        server.api_url + "/completions",
        lambda i: body,
        CLIENTS * 2,
        CLIENTS,
        timeout_s=30,
        stagger_tokens=TOKENS if staggered else None,
    )
    assert all(r.ok and r.completion_tokens == TOKENS for r in done.results)


def test_staggered_clients_start_as_the_first_request_streams(
    recorder: tuple[Recorder, LiveServer],
) -> None:
    """Client k sends once the first request has streamed k/C of its tokens: its request
    reaches the server after that many words left it."""
    rec, server = recorder
    run(server, staggered=True)
    assert len(rec.arrivals) == CLIENTS * 2
    step = TOKENS // CLIENTS
    for k in range(1, CLIENTS):
        assert rec.arrivals[k] > rec.first_stream[k * step - 1], k
    # and not much later: well before the next step's word
    assert rec.arrivals[CLIENTS - 1] < rec.first_stream[-1] + GAP


def test_burst_clients_start_together(recorder: tuple[Recorder, LiveServer]) -> None:
    rec, server = recorder
    run(server, staggered=False)
    assert len(rec.arrivals) == CLIENTS * 2
    assert all(t < rec.first_stream[-1] for t in rec.arrivals[:CLIENTS])
