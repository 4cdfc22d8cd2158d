"""A stand-in for `tuneserve serve` in the fast local-provider tests (stdlib only, loads no model).

    python fake_server.py --port 7860 [--ready-after SECONDS] [--fail]

/health -> {"status": "ok", "revision": $TUNESERVE_REVISION}; /ready -> 200 after the delay;
/v1/models -> the folders under ./models; /answer -> the text of ./answer.txt (the "code").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STARTED = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ready-after", type=float, default=0.0)
    args = parser.parse_args()
    if Path("FAIL").exists():
        print("fake server: refusing to start (a FAIL file is in the workspace)", flush=True)
        sys.exit(3)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(200, {"status": "ok", "revision": os.environ.get("TUNESERVE_REVISION")})
            elif self.path == "/ready":
                ok = time.monotonic() - STARTED >= args.ready_after
                self._send(200 if ok else 503, {"ready": ok})
            elif self.path == "/v1/models":
                names = (
                    sorted(p.name for p in Path("models").iterdir())
                    if Path("models").exists()
                    else []
                )
                cards = [{"id": "base", "object": "model"}]
                cards += [{"id": n, "object": "model", "parent": "base"} for n in names]
                self._send(200, {"object": "list", "data": cards})
            elif self.path == "/answer":
                self._send(
                    200, {"answer": Path("answer.txt").read_text().strip(), "pid": os.getpid()}
                )
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, fmt: str, *a: object) -> None:
            print("fake server:", fmt % a, flush=True)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"fake server listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
