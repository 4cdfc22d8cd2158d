"""A stand-in for `tuneserve serve` in the fast local-provider tests (loads no model).

    python fake_server.py --port 7860 [--ready-after SECONDS] [--fail]

/health -> {"status": "ok", "revision": $TUNESERVE_REVISION}; /ready -> 200 after the delay;
/v1/models -> the folders under ./models; /answer -> the text of ./answer.txt (the "code"), the
pid and the keys in the environment.
/v1/adapters: the admin API over $TUNESERVE_ADAPTER_ROOT, in the server's own protocol models
(GET lists what POST loaded, POST {"name", "path"} needs ROOT/PATH/adapter_config.json,
DELETE /v1/adapters/NAME). Those models are all it imports of tuneserve: they are light.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydantic import BaseModel

from tuneserve.server.protocol import (
    AdapterCard,
    AdapterDeleted,
    AdapterList,
    AdapterLoaded,
    AdapterLoadRequest,
    ErrorInfo,
    ErrorResponse,
)

STARTED = time.monotonic()
ADAPTER_ROOT = os.environ.get("TUNESERVE_ADAPTER_ROOT")
LOADED: dict[str, str] = {}  # adapter name -> its folder


def _card(name: str) -> AdapterCard:
    return AdapterCard(
        name=name,
        path=LOADED[name],
        source="api",
        rank=8,
        alpha=16.0,
        target_modules=["q_proj", "v_proj"],
        size_bytes=0,
        state="cpu",
        last_used=None,
        loaded_at=time.time(),
    )


def _error(message: str, param: str | None) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(message=message, type="invalid_request_error", param=param)
    )


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
            if isinstance(payload, BaseModel):
                payload = payload.model_dump(mode="json")
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
            elif self.path == "/v1/adapters":
                data = [_card(n) for n in sorted(LOADED)]
                self._send(200, AdapterList(root=ADAPTER_ROOT, data=data, errors=[]))
            elif self.path == "/answer":
                self._send(
                    200,
                    {
                        "answer": Path("answer.txt").read_text().strip(),
                        "pid": os.getpid(),
                        # the keys the platform handed the replica (the test checks them)
                        "keys": [
                            os.environ.get("TUNESERVE_API_KEY"),
                            os.environ.get("TUNESERVE_ADMIN_KEY"),
                        ],
                    },
                )
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if self.path != "/v1/adapters":
                self._send(404, _error("not found", None))
                return
            body = AdapterLoadRequest.model_validate_json(self.rfile.read(length) or b"{}")
            if not ADAPTER_ROOT:
                self._send(400, _error("no adapter root", "path"))
            elif not (Path(ADAPTER_ROOT) / body.path / "adapter_config.json").is_file():
                self._send(400, _error(f"no adapter folder at {body.path!r}", "path"))
            else:
                replaced = body.name in LOADED
                LOADED[body.name] = str(Path(ADAPTER_ROOT) / body.path)
                card = _card(body.name)
                self._send(200, AdapterLoaded(**card.model_dump(), replaced=replaced))

        def do_DELETE(self) -> None:  # noqa: N802
            name = self.path.removeprefix("/v1/adapters/")
            if LOADED.pop(name, None) is None:
                self._send(404, _error(f"adapter {name!r} is not loaded", "name"))
            else:
                self._send(200, AdapterDeleted(name=name))

        def log_message(self, fmt: str, *a: object) -> None:
            print("fake server:", fmt % a, flush=True)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"fake server listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
