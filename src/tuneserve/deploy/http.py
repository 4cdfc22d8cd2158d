"""Small blocking HTTP helpers (httpx) for readiness waits, status and log streams.

Proxy variables are ignored (trust_env=False): the local provider's replicas are on loopback,
and a corporate proxy would turn "not listening yet" into a proxy's 502."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_get(url: str, *, timeout: float = 5.0, api_key: str | None = None) -> tuple[int, bytes]:
    """(status, body); raises OSError when nothing answers."""
    try:
        response = httpx.get(url, headers=_headers(api_key), timeout=timeout, trust_env=False)
    except httpx.TransportError as exc:
        raise OSError(f"{url}: {exc or type(exc).__name__}") from None
    return response.status_code, response.content


def get_json(url: str, *, timeout: float = 5.0, api_key: str | None = None) -> Any:
    """The JSON body of a 200 answer, else None (any failure)."""
    try:
        status, body = http_get(url, timeout=timeout, api_key=api_key)
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        return None


def is_ready(base_url: str, *, timeout: float = 3.0) -> bool:
    try:
        return http_get(base_url.rstrip("/") + "/ready", timeout=timeout)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def open_lines(
    url: str, headers: dict[str, str], *, timeout: float | None
) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
    """A streamed GET as lines (no line endings), and the response (close it to stop a reader
    blocked in another thread). Raises OSError when nothing answers or the status is not 200."""
    try:
        with (
            httpx.Client(timeout=timeout, trust_env=False) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code != 200:
                raise OSError(f"{url.split('?')[0]} answered {response.status_code}")
            yield response, response.iter_lines()
    except httpx.TransportError as exc:
        raise OSError(f"{url.split('?')[0]}: {exc or type(exc).__name__}") from None


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
