"""The admin routes: adapters loaded, replaced and unloaded at runtime (server/adapter_registry.py).

    GET    /v1/adapters            what is served: rank, targets, size, state, last use; errors
    POST   /v1/adapters            {"name", "path"}: load (or atomically replace) from the root
    DELETE /v1/adapters/{name}     unload
    POST   /v1/adapters/rescan     rescan the adapter root now

vLLM's runtime LoRA routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) are accepted
too, so scripts written for vLLM work unchanged. All of them need the admin key (auth.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse

from tuneserve.errors import AdapterNotLoadedError, RegistryError
from tuneserve.server.adapter_registry import AdapterInfo, AdapterRegistry
from tuneserve.server.errors import APIError, InvalidRequestError
from tuneserve.server.protocol import (
    AdapterCard,
    AdapterDeleted,
    AdapterList,
    AdapterLoaded,
    AdapterLoadRequest,
    AdapterProblem,
    VLLMLoadRequest,
    VLLMUnloadRequest,
    error_responses,
)

router = APIRouter(prefix="/v1", tags=["adapters (admin)"])

ERRORS = error_responses(
    {
        400: "Bad name or path (named as `param`).",
        401: "Missing or wrong admin key.",
        404: "No adapter of that name is loaded.",
    }
)


def _registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry = request.app.state.adapters
    return registry


def _card(info: AdapterInfo) -> AdapterCard:
    return AdapterCard(
        name=info.name,
        path=str(info.path),
        source=info.source,
        rank=info.rank,
        alpha=info.alpha,
        target_modules=list(info.target_modules),
        size_bytes=info.size_bytes,
        state=info.state,
        last_used=info.last_used,
        loaded_at=info.loaded_at,
    )


def _listing(registry: AdapterRegistry) -> AdapterList:
    problems = [
        AdapterProblem(name=name, path=str(p.path), message=p.message)
        for name, p in registry.problems().items()
    ]
    problems += [
        AdapterProblem(name=name, path=None, message=why)
        for name, why in registry.served.adapter_errors.items()
        if name not in registry.engine.adapters and name not in registry.problems()
    ]
    return AdapterList(
        root=str(registry.root.path) if registry.root else None,
        data=[_card(info) for info in registry.infos()],
        errors=problems,
    )


def _api_error(exc: RegistryError) -> APIError:
    if isinstance(exc, AdapterNotLoadedError):
        return APIError.of_status(404, str(exc), code="adapter_not_found")
    return InvalidRequestError(str(exc), param=exc.param)


@router.get("/adapters", response_model=AdapterList, responses=ERRORS)
async def list_adapters(request: Request) -> AdapterList:
    return _listing(_registry(request))


@router.post("/adapters", response_model=AdapterLoaded, responses=ERRORS)
async def load_adapter(body: AdapterLoadRequest, request: Request) -> AdapterLoaded:
    try:
        info, replaced = await _registry(request).load(body.name, body.path)
    except RegistryError as exc:
        raise _api_error(exc) from None
    return AdapterLoaded(**_card(info).model_dump(), replaced=replaced)


@router.post("/adapters/rescan", response_model=AdapterList, responses=ERRORS)
async def rescan_adapters(request: Request) -> AdapterList:
    registry = _registry(request)
    await registry.rescan()
    return _listing(registry)


@router.delete("/adapters/{name}", response_model=AdapterDeleted, responses=ERRORS)
async def unload_adapter(name: str, request: Request) -> AdapterDeleted:
    try:
        await _registry(request).unload(name)
    except RegistryError as exc:
        raise _api_error(exc) from None
    return AdapterDeleted(name=name)


# -- vLLM's names for the same, with its plain-text answers --------------------------------
@router.post("/load_lora_adapter", response_class=PlainTextResponse, responses=ERRORS)
async def vllm_load(body: VLLMLoadRequest, request: Request) -> str:
    try:
        await _registry(request).load(body.lora_name, body.lora_path)
    except RegistryError as exc:
        error = _api_error(exc)
        error.param = {"name": "lora_name", "path": "lora_path"}.get(exc.param or "", exc.param)
        raise error from None
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, responses=ERRORS)
async def vllm_unload(body: VLLMUnloadRequest, request: Request) -> str:
    try:
        await _registry(request).unload(body.lora_name)
    except RegistryError as exc:
        raise _api_error(exc) from None
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
