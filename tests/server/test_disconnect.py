"""A client that goes away cancels its generation at once (streamed or not).

The requests ask for the whole context with ignore_eos, so only a working cancel can end
them "cancelled" within seconds; a leak would show as a running request or a "length" finish.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from tests.server.conftest import metric_value, wait_for
from tuneserve.models.demo import ADAPTER_EXAMPLES

PIRATE_HELLO, _ = ADAPTER_EXAMPLES["pirate"][0]


def cancelled_count(http: httpx.Client, model: str) -> float:
    text = http.get("/metrics").text
    return metric_value(text, "tuneserve_requests_total", model=model, finish_reason="cancelled")


def running(demo_server: Any) -> int:
    return int(demo_server.app.state.generation.engine.stats().running)


def long_request(**extra: Any) -> dict[str, Any]:
    # No max_tokens: up to the context length, which the tiny model needs many seconds for.
    return {
        "model": "pirate",
        "messages": PIRATE_HELLO,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


@pytest.mark.parametrize("n", [1, 2])
def test_closing_a_stream_cancels_its_generation(
    demo_server: Any, http: httpx.Client, n: int
) -> None:
    before = cancelled_count(http, "pirate")
    with httpx.Client(base_url=demo_server.url, timeout=60) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json=long_request(stream=True, n=n)
        ) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 2 * n + 3:  # role chunks, then some content
                    break
            assert running(demo_server) >= 1
    assert wait_for(
        lambda: cancelled_count(http, "pirate") == before + n and running(demo_server) == 0,
        timeout=15,
    ), f"still running: {running(demo_server)}"


def test_abandoning_a_plain_request_cancels_it(demo_server: Any, http: httpx.Client) -> None:
    before = cancelled_count(http, "pirate")
    body = json.dumps(long_request()).encode()
    host, port = demo_server.url.removeprefix("http://").split(":")
    # A raw socket: send the request, wait until it generates, then hang up mid-request.
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert wait_for(lambda: running(demo_server) >= 1, timeout=15)
    assert wait_for(
        lambda: cancelled_count(http, "pirate") == before + 1 and running(demo_server) == 0,
        timeout=15,
    )


def test_server_still_serves_after_disconnects(demo_server: Any, http: httpx.Client) -> None:
    body = long_request(max_tokens=3)
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
