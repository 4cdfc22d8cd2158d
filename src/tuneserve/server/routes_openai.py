"""The OpenAI-compatible routes under /v1. Thin: the handlers live on app.state (app.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tuneserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from tuneserve.server.serving_chat import OpenAIServingChat
from tuneserve.server.serving_completions import OpenAIServingCompletion
from tuneserve.server.serving_models import OpenAIServingModels
from tuneserve.server.streaming import run_until_disconnect, sse_response

router = APIRouter(prefix="/v1", tags=["openai"])

# "default" also keeps FastAPI from documenting a 422 we never send (validation is a 400).
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (names the field as `param`)."},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    "default": {"model": ErrorResponse, "description": "Any other error, in the same shape."},
}
STREAM = {"content": {"text/event-stream": {}}, "description": "With stream=true: SSE chunks."}


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(raw_request: Request) -> ModelList:
    models: OpenAIServingModels = raw_request.app.state.serving_models
    return models.list()


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, 200: STREAM},
)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
    chat: OpenAIServingChat = raw_request.app.state.serving_chat
    result = await run_until_disconnect(raw_request, chat.create(request))
    if isinstance(result, ChatCompletionResponse | Response):
        return result
    return sse_response(result)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERRORS, 200: STREAM},
)
async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
    completion: OpenAIServingCompletion = raw_request.app.state.serving_completion
    result = await run_until_disconnect(raw_request, completion.create(request))
    if isinstance(result, CompletionResponse | Response):
        return result
    return sse_response(result)
