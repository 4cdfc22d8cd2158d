"""Bearer-key auth: with an api_key set, /v1/* need `Authorization: Bearer <key>`; the admin
routes (/v1/adapters and vLLM's runtime LoRA routes) need the admin key when one is set, else
the API key. So a key handed to users of the API cannot change what is served.

Secure by default: with no key at all the admin routes are closed (401 naming the flags that
open them), since they change what is served; `open_admin` opens them for a trusted network.

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
ADMIN_PATHS = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
CHALLENGE = {"WWW-Authenticate": "Bearer"}
CLOSED_ADMIN = (
    "The admin routes (loading and unloading adapters) are closed: this server has no key. "
    "Start it with --admin-key KEY (or --api-key KEY) and send 'Authorization: Bearer KEY', "
    "or with --open-admin to open them without a key on a trusted network."
)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def key_matches(given: str | None, expected: str) -> bool:
    # compare_digest: the time taken must not tell how much of a guessed key was right.
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


class ApiKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None = None,
        admin_key: str | None = None,
        open_admin: bool = False,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key or api_key
        self.open_admin = open_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if _under(path, ADMIN_PATHS) and not self.admin_key and not self.open_admin:
            await error_response(AuthenticationError(CLOSED_ADMIN), headers=CHALLENGE)(
                scope, receive, send
            )
            return
        if _under(path, ADMIN_PATHS):
            accepted = [self.admin_key]
            message = "Missing or invalid admin key: send 'Authorization: Bearer <admin key>'."
        elif _under(path, (PROTECTED_PREFIX,)):
            # The admin key works wherever the API key does.
            accepted = [self.api_key, self.admin_key] if self.api_key else []
            message = None
        else:
            accepted = []
        keys = [key for key in accepted if key]
        if not keys:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if any(key_matches(given, key) for key in keys):
            await self.app(scope, receive, send)
            return
        error = AuthenticationError(message) if message else AuthenticationError()
        response = error_response(error, headers=CHALLENGE)
        await response(scope, receive, send)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)
