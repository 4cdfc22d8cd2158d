"""The local provider's stable endpoint: a tiny loopback TCP proxy.

    python -m tuneserve.deploy.proxy --port 7861 --routes .tuneserve/apps/<app>/routes.json

It listens on 127.0.0.1:PORT (the endpoint in infra/inference.config.json) and pipes every new
connection to one of the current revision's replica ports, round-robin, skipping replicas that
refuse. The routes file ({"revision": ..., "ports": [...]}) is re-read when it changes, so a
deploy switches traffic by replacing that file atomically: connections opened after the switch
reach the new revision, open ones finish on the old. With no routes it answers 503 itself.
It works at the TCP level, so SSE streams and websockets pass through untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
from pathlib import Path

CONNECT_TIMEOUT_S = 5.0


def _http_error(status: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "unavailable", "code": status[:3]}})
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()


class Routes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.revision: str | None = None
        self.ports: list[int] = []
        self._counter = itertools.count()

    def refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.revision, self.ports, self._stamp = None, [], None
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.revision = data.get("revision")
            self.ports = [int(p) for p in data.get("ports", [])]
            self._stamp = stamp
        except (OSError, ValueError, TypeError):
            pass  # half-written or broken: keep the previous routes

    def order(self) -> list[int]:
        """The replica ports to try for one connection, starting at the next in turn."""
        if not self.ports:
            return []
        start = next(self._counter) % len(self.ports)
        return self.ports[start:] + self.ports[:start]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _handle(
    routes: Routes, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    routes.refresh()
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    for port in routes.order():
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S
            )
            break
        except (OSError, asyncio.TimeoutError):
            continue
    try:
        if upstream is None:
            message = (
                "no revision is serving yet: run 'tuneserve deploy'"
                if not routes.ports
                else f"no replica of revision {routes.revision} accepts connections"
            )
            status = "503 Service Unavailable" if not routes.ports else "502 Bad Gateway"
            client_w.write(_http_error(status, message))
            await client_w.drain()
            return
        up_r, up_w = upstream
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
        up_w.close()
    finally:
        with contextlib.suppress(Exception):
            client_w.close()


async def serve(port: int, routes_path: Path) -> None:
    routes = Routes(routes_path)
    server = await asyncio.start_server(
        lambda r, w: _handle(routes, r, w), host="127.0.0.1", port=port, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"proxy pid {os.getpid()} listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--routes", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.routes))


if __name__ == "__main__":
    main()
