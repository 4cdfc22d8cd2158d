"""Small blocking HTTP helpers for readiness waits and status (stdlib only, no proxies)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, *, timeout: float = 5.0, api_key: str | None = None) -> tuple[int, bytes]:
    """(status, body); raises OSError when nothing answers."""
    request = urllib.request.Request(url, method="GET")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read() or b""
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, OSError) else OSError(str(exc.reason))
        raise reason from None


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
