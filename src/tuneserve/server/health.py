"""GET /health (liveness: the process answers) and GET /ready (readiness: the engine runs).

Container probes use them: liveness must not depend on the model (a slow load must not get
the replica killed), readiness must (no traffic before the engine accepts work).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from tuneserve.server.errors import ServiceUnavailableError
from tuneserve.server.generation import GenerationService

# Set by `tuneserve deploy` so a caller can tell which revision of the code answers.
REVISION_ENV = "TUNESERVE_REVISION"

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process is up")
async def health() -> dict[str, Any]:
    body: dict[str, Any] = {"status": "ok"}
    revision = os.environ.get(REVISION_ENV)
    if revision:
        body["revision"] = revision
    return body


@router.get(
    "/ready",
    summary="Readiness: the engine accepts requests",
    responses={
        503: {"description": "Not ready: the engine is starting, or the server is draining."}
    },
)
async def ready(request: Request) -> dict[str, Any]:
    service: GenerationService = request.app.state.generation
    if request.app.state.lifecycle.draining:
        raise ServiceUnavailableError(
            "The server is shutting down (draining running requests).", code="draining"
        )
    if not service.engine.is_running:
        raise ServiceUnavailableError(
            "The engine is not running yet (or any more).", code="not_ready"
        )
    return {"status": "ready", "models": service.model_ids()}
