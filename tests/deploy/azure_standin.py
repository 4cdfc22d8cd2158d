"""A loopback HTTP STAND-IN for the few Azure REST endpoints the Azure provider calls. It is not
Azure and proves nothing about Azure's behaviour: it records what the real SDK clients send and
answers in the documented wire shapes, so the tests can check that the provider sends the right
requests (ARM deployment body, revision suffix PATCH, file uploads) and reads the answers right.

ARM (base_url = http://127.0.0.1:PORT):
  HEAD/PUT  /subscriptions/{s}/resourcegroups/{rg}
  PUT       .../providers/Microsoft.Resources/deployments/{name}   -> outputs (Succeeded at once)
  GET/PATCH .../providers/Microsoft.App/containerApps/{app}        PATCH makes a new revision
  GET       .../containerApps/{app}/revisions/{rev}                Running/Healthy unless told
  POST      .../containerApps/{app}/revisions/{rev}/deactivate
  GET       .../containerApps/{app}/revisions/{rev}/replicas
  POST      .../containerApps/{app}/getAuthtoken
  GET       /logstream/...                                         the log stream
  GET       /app/health, /app/ready, /app/v1/models                the app's endpoint
  GET/POST  /app/v1/adapters, DELETE /app/v1/adapters/{name}       its admin API (recorded)
File REST (Azurite-style account URL http://127.0.0.1:PORT/devstoreaccount1): list directory,
create directory, rename directory, delete (empty) directory, create file, put range, get
properties, download, delete.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape

ACCOUNT = "devstoreaccount1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class StandIn:
    port: int = 0
    groups: set[str] = field(default_factory=set)
    requests: list[Recorded] = field(default_factory=list)
    files: dict[str, bytearray] = field(default_factory=dict)  # "share/dir/file" -> bytes
    stamps: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)  # "share/dir"
    app: dict[str, Any] = field(default_factory=dict)
    revisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_next_revision: bool = False
    deactivated: list[str] = field(default_factory=list)
    clock: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # loaded through /app/v1/adapters

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def serving(self) -> str | None:
        return self.app.get("properties", {}).get("latestReadyRevisionName")


def start(state: StandIn) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _handler(s: StandIn) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(
            self,
            code: int,
            body: Any = None,
            headers: dict[str, str] | None = None,
            raw: bytes | None = None,
        ) -> None:
            data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
            self.send_response(code)
            hdrs = {"Content-Type": "application/json", "x-ms-request-id": "1"}
            hdrs.update(headers or {})
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, code: int, error_code: str) -> None:
            body = (
                '<?xml version="1.0" encoding="utf-8"?><Error>'
                f"<Code>{error_code}</Code><Message>{error_code}</Message></Error>"
            )
            self._reply(
                code,
                headers={"x-ms-error-code": error_code, "Content-Type": "application/xml"},
                raw=body.encode(),
            )

        def _dispatch(self) -> None:
            url = urlparse(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = raw
            if raw and "json" in (self.headers.get("Content-Type") or ""):
                body = json.loads(raw)
            with lock:
                s.requests.append(Recorded(self.command, path, query, body))
                if path.startswith(f"/{ACCOUNT}/"):
                    return self._files(path[len(ACCOUNT) + 2 :], query, raw)
                if path.startswith("/app/"):
                    return self._app(path[4:], body)
                if path.startswith("/logstream"):
                    return self._reply(
                        200, raw=b"line one\nline two\n", headers={"Content-Type": "text/plain"}
                    )
                return self._arm(path, body)

        do_GET = do_PUT = do_PATCH = do_POST = do_HEAD = do_DELETE = _dispatch

        # -- ARM --

        def _arm(self, path: str, body: Any) -> None:
            low = path.lower()
            m = re.fullmatch(r"/subscriptions/([^/]+)/resourcegroups/([^/]+)", low)
            if m:
                if self.command == "HEAD":
                    return self._reply(204 if m.group(2) in s.groups else 404)
                s.groups.add(m.group(2))
                return self._reply(
                    201, {"id": path, "name": m.group(2), "location": body["location"]}
                )
            if "/providers/microsoft.resources/deployments/" in low and self.command == "PUT":
                params = body["properties"]["parameters"]
                port = s.port
                outputs = {
                    "SUBSCRIPTION_ID": path.split("/")[2],
                    "RESOURCE_GROUP_NAME": path.split("/")[4],
                    "STORAGE_ACCOUNT_NAME": params.get("storageAccountName", {}).get(
                        "value", "aistorageabcde"
                    ),
                    "FILE_SHARE_NAME": params.get("fileShareName", {}).get(
                        "value", "aifileshareabcde"
                    ),
                    "ACA_APP_NAME": params.get("acaAppName", {}).get("value", "aiacaappabcde"),
                    "ACA_APP_ENDPOINT": f"http://127.0.0.1:{port}/app",
                }
                s.dirs.add(outputs["FILE_SHARE_NAME"])
                name = outputs["ACA_APP_NAME"]
                s.app = s.app or {
                    "id": path,
                    "name": name,
                    "location": "westus3",
                    "properties": {
                        "provisioningState": "Succeeded",
                        "runningStatus": "Running",
                        "latestRevisionName": f"{name}--first",
                        "latestReadyRevisionName": f"{name}--first",
                        "eventStreamEndpoint": f"http://127.0.0.1:{port}/logstream/subscriptions/x/eventstream",
                        "configuration": {
                            "activeRevisionsMode": "Single",
                            "ingress": {"fqdn": "stand.in"},
                        },
                        "template": {"containers": [{"name": "inference", "image": "img"}]},
                    },
                }
                s.revisions.setdefault(f"{name}--first", _revision("Running", "Healthy"))
                return self._reply(
                    200,
                    {
                        "id": path,
                        "name": path.rsplit("/", 1)[1],
                        "properties": {
                            "provisioningState": "Succeeded",
                            "outputs": {
                                k: {"type": "String", "value": v} for k, v in outputs.items()
                            },
                        },
                    },
                )
            m = re.search(r"/containerapps/([^/]+)(/.*)?$", low)
            if m:
                return self._container_app(m.group(2) or "", body)
            return self._reply(404, {"error": {"code": "NotFound", "message": path}})

        def _container_app(self, rest: str, body: Any) -> None:
            props = s.app["properties"]
            if rest == "" and self.command == "GET":
                return self._reply(200, s.app)
            if rest == "" and self.command == "PATCH":
                suffix = body["properties"]["template"]["revisionSuffix"]
                revision = f"{s.app['name']}--{suffix}"
                props["template"] = body["properties"]["template"]
                props["latestRevisionName"] = revision
                if s.fail_next_revision:
                    s.revisions[revision] = _revision("Failed", "Unhealthy")
                    s.fail_next_revision = False
                else:
                    s.revisions[revision] = _revision("Running", "Healthy")
                    props["latestReadyRevisionName"] = revision
                return self._reply(200, s.app)
            if rest == "/getauthtoken":
                return self._reply(200, {"properties": {"token": "stand-in-token"}})
            m = re.fullmatch(r"/revisions/([^/]+)(/[a-z]+)?", rest)
            if m:
                revision = next(r for r in s.revisions if r.lower() == m.group(1))
                if m.group(2) == "/deactivate":
                    s.deactivated.append(revision)
                    return self._reply(200)
                if m.group(2) == "/replicas":
                    return self._reply(
                        200,
                        {
                            "value": [
                                {
                                    "name": f"{revision}-replica",
                                    "properties": {
                                        "runningState": "Running",
                                        "containers": [{"name": "inference"}],
                                    },
                                }
                            ]
                        },
                    )
                return self._reply(200, {"name": revision, "properties": s.revisions[revision]})
            return self._reply(404, {"error": {"code": "NotFound", "message": rest}})

        def _app(self, rest: str, body: Any) -> None:
            if rest == "/v1/adapters" and self.command == "POST":
                replaced = body["name"] in s.adapters
                s.adapters[body["name"]] = body["path"]
                card = {"name": body["name"], "path": f"/mount/models/{body['path']}", "rank": 8}
                return self._reply(
                    200, {**card, "target_modules": ["q_proj"], "replaced": replaced}
                )
            if rest == "/v1/adapters":
                data = [{"name": n, "path": f"/mount/models/{p}"} for n, p in s.adapters.items()]
                return self._reply(200, {"root": "/mount/models", "data": data, "errors": []})
            if rest.startswith("/v1/adapters/") and self.command == "DELETE":
                name = rest.rsplit("/", 1)[1]
                if s.adapters.pop(name, None) is None:
                    return self._reply(404, {"error": {"message": f"{name} is not loaded"}})
                return self._reply(200, {"name": name, "object": "adapter", "deleted": True})
            if rest == "/health":
                return self._reply(200, {"status": "ok", "revision": s.serving()})
            if rest == "/ready":
                return self._reply(200, {"ready": True})
            if rest == "/v1/models":
                return self._reply(
                    200, {"data": [{"id": "base"}, {"id": "pirate", "parent": "base"}]}
                )
            return self._reply(404)

        # -- File REST --

        def _files(self, rest: str, query: dict[str, list[str]], raw: bytes) -> None:
            rest = rest.rstrip("/")
            restype, comp = query.get("restype", [""])[0], query.get("comp", [""])[0]
            if restype == "directory" and comp == "list" and self.command == "GET":
                if rest not in s.dirs:
                    return self._error(404, "ResourceNotFound")
                prefix = rest + "/"
                entries = []
                for d in sorted(s.dirs):
                    if d.startswith(prefix) and "/" not in d[len(prefix) :]:
                        entries.append(
                            f"<Directory><Name>{escape(d[len(prefix) :])}</Name>"
                            "<Properties /></Directory>"
                        )
                for f, data in sorted(s.files.items()):
                    if f.startswith(prefix) and "/" not in f[len(prefix) :]:
                        entries.append(
                            f"<File><Name>{escape(f[len(prefix) :])}</Name><Properties>"
                            f"<Content-Length>{len(data)}</Content-Length>"
                            f"<LastWriteTime>{_iso(s.stamps[f])}</LastWriteTime><Last-Modified>"
                            f"{formatdate(1_700_000_000 + s.stamps[f], usegmt=True)}"
                            "</Last-Modified></Properties></File>"
                        )
                xml = (
                    '<?xml version="1.0" encoding="utf-8"?><EnumerationResults '
                    f'ServiceEndpoint="{s.url}/{ACCOUNT}/" ShareName="{rest.split("/")[0]}">'
                    f"<Entries>{''.join(entries)}</Entries><NextMarker /></EnumerationResults>"
                )
                return self._reply(
                    200, raw=xml.encode(), headers={"Content-Type": "application/xml"}
                )
            if restype == "directory" and comp == "rename" and self.command == "PUT":
                source = unquote(urlparse(self.headers["x-ms-file-rename-source"]).path)
                source = source.removeprefix(f"/{ACCOUNT}/").rstrip("/")
                if source not in s.dirs:
                    return self._error(404, "ResourceNotFound")
                if rest in s.dirs or rest in s.files:
                    return self._error(409, "ResourceAlreadyExists")

                def moved(path: str) -> str:
                    return rest + path[len(source) :]

                inside = [p for p in s.dirs if p == source or p.startswith(source + "/")]
                s.dirs.difference_update(inside)
                s.dirs.update(moved(p) for p in inside)
                for path in [p for p in s.files if p.startswith(source + "/")]:
                    s.files[moved(path)] = s.files.pop(path)
                    s.stamps[moved(path)] = s.stamps.pop(path)
                return self._reply(200, headers=self._stamp_headers(rest))
            if restype == "directory" and self.command == "DELETE":
                if rest not in s.dirs:
                    return self._error(404, "ResourceNotFound")
                inside = rest + "/"
                if any(p.startswith(inside) for p in (*s.dirs, *s.files)):
                    return self._error(409, "DirectoryNotEmpty")
                s.dirs.discard(rest)
                return self._reply(202)
            if restype == "directory" and self.command == "PUT":
                if rest in s.dirs:
                    return self._error(409, "ResourceAlreadyExists")
                s.dirs.add(rest)
                return self._reply(201, headers=self._stamp_headers(rest))
            if self.command == "PUT" and comp == "range":
                start, end = (int(x) for x in self.headers["x-ms-range"].split("=")[1].split("-"))
                s.files[rest][start : end + 1] = raw
                s.clock += 1
                s.stamps[rest] = s.clock
                return self._reply(201, headers=self._stamp_headers(rest))
            if self.command == "PUT":
                s.files[rest] = bytearray(int(self.headers["x-ms-content-length"]))
                s.clock += 1
                s.stamps[rest] = s.clock
                return self._reply(201, headers=self._stamp_headers(rest))
            if rest not in s.files:
                return self._error(404, "ResourceNotFound")
            if self.command == "DELETE":
                del s.files[rest]
                return self._reply(202)
            data = bytes(s.files[rest])
            headers = {
                **self._stamp_headers(rest),
                "x-ms-type": "File",
                "Content-Type": "application/octet-stream",
            }
            if self.command == "HEAD":
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return None
            wanted = self.headers.get("x-ms-range") or self.headers.get("Range")
            if wanted and data:
                start, _, end = wanted.split("=")[1].partition("-")
                first, last = int(start), min(int(end or len(data) - 1), len(data) - 1)
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                return self._reply(206, raw=data[first : last + 1], headers=headers)
            if wanted:  # Azure answers 416 for a range of an empty file
                return self._error(416, "InvalidRange")
            return self._reply(200, raw=data, headers=headers)

        def _stamp_headers(self, rest: str) -> dict[str, str]:
            stamp = s.stamps.get(rest, 0)
            return {
                "ETag": f'"0x{stamp:x}"',
                "Last-Modified": formatdate(1_700_000_000 + stamp, usegmt=True),
                "x-ms-file-last-write-time": _iso(stamp),
            }

    return H


def _iso(stamp: int) -> str:
    return f"2026-01-01T00:00:{stamp % 60:02d}.{stamp:07d}Z"


def _revision(running: str, health: str) -> dict[str, Any]:
    return {
        "provisioningState": "Provisioned" if running != "Failed" else "Failed",
        "runningState": running,
        "healthState": health,
        "active": True,
    }
