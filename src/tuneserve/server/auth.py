"""Bearer-key auth for the API: with an api_key set, /v1/* need `Authorization: Bearer <key>`.

/health, /ready and /metrics stay open: probes and Prometheus scrapers carry no key, and
they reveal only liveness, model names and counters (put /metrics behind the ingress if
that matters). The chat UI at / has its own login (server/ui.py). A pure ASGI middleware,
not a dependency: it answers before the body is read or validated, and covers every
router under /v1, present and future.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from tuneserve.server.error_handlers import error_response
from tuneserve.server.errors import AuthenticationError

PROTECTED_PREFIX = "/v1"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def key_matches(given: str | None, expected: str) -> bool:
    # compare_digest: the time taken must not tell how much of a guessed key was right.
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not _is_protected(scope["path"])
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if key_matches(bearer_token(authorization), self.api_key):
            await self.app(scope, receive, send)
            return
        response = error_response(AuthenticationError(), headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
