"""The admin routes: adapters loaded, replaced and unloaded at runtime (server/adapter_registry.py).

    GET    /v1/adapters            what is served: rank, targets, size, state, last use; errors
    POST   /v1/adapters            {"name", "path"}: load (or atomically replace) from the root
    DELETE /v1/adapters/{name}     unload
    POST   /v1/adapters/rescan     rescan the adapter root now

vLLM's runtime LoRA routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) are accepted
too, so scripts written for vLLM work unchanged. All of them need the admin key (auth.py).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import PlainTextResponse

from tuneserve.server.adapter_registry import AdapterInfo, AdapterRegistry, RegistryError
from tuneserve.server.errors import APIError, InvalidRequestError
from tuneserve.server.protocol import ErrorResponse

router = APIRouter(prefix="/v1", tags=["adapters (admin)"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad name or path (named as `param`)."},
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key."},
    404: {"model": ErrorResponse, "description": "No adapter of that name is loaded."},
    "default": {"model": ErrorResponse, "description": "Any other error, in the same shape."},
}


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="The adapter's id in requests (`model`).", examples=["support-v2"]
    )
    path: str = Field(
        description="Its folder, relative to the adapter root (or absolute, inside it).",
        examples=["support-v2"],
    )


class AdapterCard(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    path: str
    source: Literal["startup", "api", "share"]
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    state: Literal["hot", "cpu", "disk"] = Field(
        description="hot: in an engine slot; cpu: in CPU memory; disk: read on first use."
    )
    last_used: float | None = Field(description="Unix time of the last request using it.")
    loaded_at: float


class AdapterLoaded(AdapterCard):
    replaced: bool = Field(description="True when it replaced an adapter of the same name.")


class AdapterProblem(BaseModel):
    name: str
    path: str | None
    message: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    root: str | None = Field(description="The adapter root; null when none is configured.")
    data: list[AdapterCard]
    errors: list[AdapterProblem]


class AdapterDeleted(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class VLLMLoadRequest(BaseModel):
    lora_name: str
    lora_path: str


class VLLMUnloadRequest(BaseModel):
    lora_name: str


def _registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry = request.app.state.adapters
    return registry


def _card(info: AdapterInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "path": str(info.path),
        "source": info.source,
        "rank": info.rank,
        "alpha": info.alpha,
        "target_modules": list(info.target_modules),
        "size_bytes": info.size_bytes,
        "state": info.state,
        "last_used": info.last_used,
        "loaded_at": info.loaded_at,
    }


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
        data=[AdapterCard(**_card(info)) for info in registry.infos()],
        errors=problems,
    )


def _api_error(exc: RegistryError) -> APIError:
    if exc.missing:
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
    return AdapterLoaded(**_card(info), replaced=replaced)


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
