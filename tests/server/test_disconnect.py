"""A client that goes away cancels its generation at once (streamed or not).

The requests ask for the whole context with ignore_eos, so only a working cancel can end
them "cancelled" within seconds; a leak would show as a running request or a "length" finish.
The demo's own 1,024 positions now take the engine under a second, less than a busy test
process may take to read a few streamed lines: these tests serve it with a longer context.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import metric_value, wait_for
from tuneserve.models.demo import ADAPTER_EXAMPLES

PIRATE_HELLO, _ = ADAPTER_EXAMPLES["pirate"][0]
LONG_CONTEXT = 16384  # positions: ~16x the demo's, many seconds of decoding


@pytest.fixture(scope="module")
def long_server(demo_server_factory: Any) -> Any:
    """The demo with a LONG_CONTEXT context (past the model's 1,024 positions: what comes out
    there does not matter here), so that a request for all of it outlasts any scheduling delay."""
    return demo_server_factory(max_model_len=LONG_CONTEXT, engine={"max_num_seqs": 4})


@pytest.fixture
def long_http(long_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=long_server.url, timeout=120) as c:
        yield c


def cancelled_count(http: httpx.Client, model: str) -> float:
    text = http.get("/metrics").text
    return metric_value(text, "tuneserve_requests_total", model=model, finish_reason="cancelled")


def running(demo_server: Any) -> int:
    return int(demo_server.app.state.generation.engine.stats().running)


def long_request(**extra: Any) -> dict[str, Any]:
    # No max_tokens: up to the context length (LONG_CONTEXT), many seconds for the tiny model.
    return {
        "model": "pirate",
        "messages": PIRATE_HELLO,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


@pytest.mark.parametrize("n", [1, 2])
def test_closing_a_stream_cancels_its_generation(
    long_server: Any, long_http: httpx.Client, n: int
) -> None:
    before = cancelled_count(long_http, "pirate")
    with httpx.Client(base_url=long_server.url, timeout=60) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json=long_request(stream=True, n=n)
        ) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 2 * n + 3:  # role chunks, then some content
                    break
            assert running(long_server) >= 1
    assert wait_for(
        lambda: cancelled_count(long_http, "pirate") == before + n and running(long_server) == 0,
        timeout=15,
    ), f"still running: {running(long_server)}"


def test_abandoning_a_plain_request_cancels_it(long_server: Any, long_http: httpx.Client) -> None:
    before = cancelled_count(long_http, "pirate")
    body = json.dumps(long_request()).encode()
    host, port = long_server.url.removeprefix("http://").split(":")
    # A raw socket: send the request, wait until it generates, then hang up mid-request.
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert wait_for(lambda: running(long_server) >= 1, timeout=15)
    assert wait_for(
        lambda: cancelled_count(long_http, "pirate") == before + 1 and running(long_server) == 0,
        timeout=15,
    )


def test_server_still_serves_after_disconnects(long_server: Any, long_http: httpx.Client) -> None:
    body = long_request(max_tokens=3)
    response = long_http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
