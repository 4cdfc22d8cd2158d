"""Per-request context: an X-Request-Id (the client's, or a new one) echoed on the response
and named in the log of a failure; and the last-resort 500, in OpenAI's shape, for an
unhandled exception.

A pure ASGI middleware: Starlette's BaseHTTPMiddleware would buffer the receive channel that
streaming responses watch for client disconnects.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneserve.server.error_handlers import error_response
from tuneserve.server.errors import APIError

logger = logging.getLogger(__name__)

HEADER = "X-Request-Id"
# Echo only ids that are safe in a header and a log line.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.exception(
                "request %s %s %s failed", request_id, scope.get("method"), scope.get("path")
            )
            if started:
                raise  # headers are out: nothing to do but drop the connection
            error = APIError(
                f"Internal server error ({type(exc).__name__}); request id {request_id}.",
                code="internal_error",
            )
            await error_response(error)(scope, receive, send_with_id)
