"""Every error the API returns, in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Our own code raises server.errors.APIError; FastAPI's request validation (a 422 in its own
shape by default) becomes a 400 invalid_request_error whose message names the field, the
value and what is accepted, and whose `param` is the field's path ("messages[0].role").
Unhandled exceptions become a 500 in RequestContextMiddleware, which knows the request id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from tuneserve.errors import EngineError, TuneserveError, UnknownAdapterError
from tuneserve.server.errors import APIError, InvalidRequestError, ModelNotFoundError

logger = logging.getLogger(__name__)

# pydantic puts a union member's type into the error location ("str", "list[int]"); those are
# not fields the user wrote, so the param leaves them out.
_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
_MAX_SHOWN_VALUE = 80


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def as_api_error(exc: Exception) -> APIError:
    """The API error to report for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        # The engine's word: the adapter went away between resolve_adapter and submit.
        return ModelNotFoundError(exc.name, exc.available)
    if isinstance(exc, EngineError):
        logger.error("generation failed: %s", exc)
        return APIError(f"Generation failed: {exc}", code="engine_error")
    if isinstance(exc, TuneserveError):
        return InvalidRequestError(str(exc))
    logger.error("unexpected error while generating", exc_info=exc)
    return APIError(f"Internal error while generating: {type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(TuneserveError, _tuneserve_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _tuneserve_error(request: Request, exc: TuneserveError) -> JSONResponse:
    return error_response(as_api_error(exc))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"Not found: {request.method} {request.url.path}. See /docs for the API's routes."
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Method {request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allowed}." if allowed else "."
        )
    else:
        message = str(exc.detail)
    error = APIError.of_status(exc.status_code, message)
    return error_response(error, headers=dict(exc.headers) if exc.headers else None)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(describe_validation_error(exc.errors()))


def describe_validation_error(errors: Sequence[Any]) -> InvalidRequestError:
    """One 400 for all of a request's validation errors; `param` names the first field."""
    by_param: dict[str | None, list[dict[str, Any]]] = {}
    for err in errors:
        by_param.setdefault(_param_of(err), []).append(err)
    by_param = _without_failed_union_branches(by_param)
    messages = [_describe(param, errs) for param, errs in by_param.items()]
    return InvalidRequestError(" ".join(messages), param=next(iter(by_param), None))


def _without_failed_union_branches(
    by_param: dict[str | None, list[dict[str, Any]]],
) -> dict[str | None, list[dict[str, Any]]]:
    """For `content: str | list[part]` given a list with a bad part, pydantic reports both
    "not a string" at content and the part's real problem deeper down; keep the deeper one."""

    def shadowed(param: str | None, errs: list[dict[str, Any]]) -> bool:
        if param is None or not all(str(e.get("type", "")).endswith("_type") for e in errs):
            return False
        return any(
            other is not None and other.startswith((param + "[", param + ".")) for other in by_param
        )

    kept = {p: errs for p, errs in by_param.items() if not shadowed(p, errs)}
    return kept or by_param


def _param_of(err: dict[str, Any]) -> str | None:
    loc = list(err.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return None
    path = ""
    for position, item in enumerate(loc):
        unknown_key = err.get("type") == "extra_forbidden" and position == len(loc) - 1
        if isinstance(item, int):
            path += f"[{item}]"
        elif unknown_key or (_FIELD_NAME.match(item) and item not in _TYPE_TAGS):
            path += f".{item}" if path else item
    extra = (err.get("ctx") or {}).get("param")  # protocol.field_error: a cross-field rule
    if extra:
        path = f"{path}.{extra}" if path else extra
    return path or None


def _describe(param: str | None, errs: list[dict[str, Any]]) -> str:
    first = errs[0]
    kind = first.get("type")
    if kind == "json_invalid":
        position = first["loc"][-1]
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return f"The request body is not valid JSON: {reason} (at character {position})."
    if param is None:
        hint = ""
        if isinstance(first.get("input"), bytes | str):
            hint = " Send it with 'Content-Type: application/json'."
        if kind == "missing":
            return "The request needs a JSON body." + hint
        return f"The request body must be a JSON object: {first.get('msg')}." + hint
    if kind == "missing":
        return f"Missing required field '{param}'."
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}."  # OpenAI's words
    reasons = list(dict.fromkeys(_clean(e.get("msg", "")) for e in errs))
    if len(reasons) > 1 and all(r.startswith("Input should be ") for r in reasons):
        reasons = [reasons[0], *(r.removeprefix("Input should be ") for r in reasons[1:])]
    message = f"Invalid value for '{param}': {' or '.join(reasons)}"
    if kind != "invalid_field":
        shown = _shown_value(first.get("input"))
        if shown is not None:
            message += f" (got {shown})"
    return message + "."


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _shown_value(value: Any) -> str | None:
    if isinstance(value, dict):
        return None
    shown = repr(value)
    if len(shown) > _MAX_SHOWN_VALUE:
        shown = shown[: _MAX_SHOWN_VALUE - 3] + "..."
    return shown
