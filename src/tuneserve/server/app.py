"""The app factory: composes the service, routes, middlewares and the UI. No logic lives here.

Order matters once the UI is mounted at "/": a mount catches every path, so the API routes
and the /v1 fallback (which keeps unknown /v1 paths in OpenAI's error shape) come first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

from fastapi import FastAPI, Request
from starlette.routing import Match, Mount

from tuneserve.engine.base import Engine
from tuneserve.models.adapter_root import AdapterRoot
from tuneserve.models.types import ServedModel
from tuneserve.server import health, metrics, routes_adapters, routes_openai
from tuneserve.server.adapter_registry import AdapterRegistry
from tuneserve.server.auth import ApiKeyMiddleware
from tuneserve.server.error_handlers import install_error_handlers
from tuneserve.server.errors import APIError
from tuneserve.server.generation import GenerationService
from tuneserve.server.lifecycle import DrainMiddleware, Lifecycle
from tuneserve.server.request_context import RequestContextMiddleware
from tuneserve.server.serving_chat import OpenAIServingChat
from tuneserve.server.serving_completions import OpenAIServingCompletion
from tuneserve.server.serving_models import OpenAIServingModels

logger = logging.getLogger(__name__)

API_DESCRIPTION = """An OpenAI-compatible API over a base model and its LoRA adapters.

`model` in a request is an adapter's name, or the base model's name for no adapter;
`GET /v1/models` lists them. With an API key set, `/v1/*` needs `Authorization: Bearer <key>`;
`/health`, `/ready` and `/metrics` stay open. Adapters are loaded, replaced and unloaded at
runtime through `/v1/adapters` (the admin key, or else the API key).
"""


def create_app(
    served: ServedModel,
    engine: Engine,
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    ui: bool = True,
    adapter_root: Path | None = None,
    rescan_interval: float = 10.0,
    open_admin: bool = False,
    notice: str | None = None,
    about: str | None = None,
) -> FastAPI:
    """The whole server as one ASGI app; its lifespan starts and stops `engine` and the
    rescans of `adapter_root` (the folder adapters may be loaded from at runtime).

    The admin routes are closed unless `admin_key` or `api_key` is set, or `open_admin` opens
    them for a trusted network. `notice` is a warning for the UI's header, `about` a line
    saying what is served (the demo says what it is).
    `app.state.lifecycle` is what a DrainingServer drains."""
    observer = metrics.PrometheusMetrics(engine, served.base_name)
    lifecycle = Lifecycle()
    registry = AdapterRegistry(
        engine,
        served,
        root=AdapterRoot.at(adapter_root) if adapter_root is not None else None,
        rescan_interval=rescan_interval,
    )
    service = GenerationService(
        engine, served, observer=observer, finder=registry, lifecycle=lifecycle
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # engine.start() blocks until the engine accepts work: keep the event loop free.
        await asyncio.to_thread(engine.start)
        await registry.start()
        logger.info("serving %s", ", ".join(service.model_ids()))
        try:
            yield
        finally:
            await registry.stop()
            # Pending requests finish as "cancelled"; their streams end with an error event.
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="tuneserve", description=API_DESCRIPTION, lifespan=lifespan)
    app.state.generation = service
    app.state.lifecycle = lifecycle
    app.state.adapters = registry
    app.state.metrics = observer
    app.state.serving_models = OpenAIServingModels(service, registry)
    app.state.serving_chat = OpenAIServingChat(service)
    app.state.serving_completion = OpenAIServingCompletion(service)

    install_error_handlers(app)
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)
    app.add_middleware(
        ApiKeyMiddleware, api_key=api_key, admin_key=admin_key, open_admin=open_admin
    )
    app.add_middleware(RequestContextMiddleware)  # outermost: ids and 500s for all the rest

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_adapters.router)
    add_v1_fallback(app)

    if ui:
        from tuneserve.server.ui import build_ui, mount_ui

        blocks = build_ui(service, api_key=api_key, notice=notice, about=about)
        mount_ui(app, blocks, api_key=api_key)
    return app


def add_v1_fallback(app: FastAPI) -> None:
    """Unknown /v1 paths answer 404 (or 405 for a known path) in OpenAI's shape, even with
    the UI mounted at "/" (which would otherwise answer them). Register after all /v1 routes."""

    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
        response_model=None,
    )
    async def v1_fallback(request: Request, path: str) -> NoReturn:
        allowed = allowed_methods(app, request.scope["path"], exclude=v1_fallback)
        if allowed:
            raise APIError.of_status(
                405,
                f"Method {request.method} is not allowed on {request.url.path}; "
                f"allowed: {', '.join(allowed)}.",
                code="method_not_allowed",
            )
        raise APIError.of_status(
            404,
            f"Unknown route {request.method} {request.url.path}. The API has "
            "/v1/models, /v1/chat/completions, /v1/completions and /v1/adapters (see /docs).",
            code="not_found",
        )


def allowed_methods(app: FastAPI, path: str, *, exclude: object) -> list[str]:
    """The methods some API route (not a mount, not `exclude`) serves at `path`."""
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope: dict[str, Any] = {
            "type": "http",
            "path": path,
            "root_path": "",
            "method": method,
            "headers": [],
        }
        for route in app.router.routes:
            if isinstance(route, Mount) or getattr(route, "endpoint", None) is exclude:
                continue
            if route.matches(scope)[0] == Match.FULL:
                allowed.append(method)
                break
    return allowed
