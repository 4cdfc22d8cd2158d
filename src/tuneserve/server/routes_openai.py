"""The OpenAI-compatible routes under /v1. Thin: the handlers live on app.state (app.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request

from tuneserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    error_responses,
)
from tuneserve.server.serving_chat import OpenAIServingChat
from tuneserve.server.serving_completions import OpenAIServingCompletion
from tuneserve.server.serving_models import OpenAIServingModels
from tuneserve.server.streaming import run_until_disconnect, sse_response

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS = error_responses(
    {
        400: "Invalid request (names the field as `param`).",
        401: "Missing or wrong API key.",
        404: "Unknown model.",
    }
)
STREAM = {"content": {"text/event-stream": {}}, "description": "With stream=true: SSE chunks."}
GENERATES = {**ERRORS, 200: STREAM}


async def _answer(raw_request: Request, work: Awaitable[Any | AsyncIterator[str]]) -> Any:
    """A handler's whole response as is, its chunks (stream=true) as SSE; 499 when the
    client left first."""
    result = await run_until_disconnect(raw_request, work)
    if isinstance(result, AsyncIterator):
        return sse_response(result)
    return result


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(raw_request: Request) -> ModelList:
    models: OpenAIServingModels = raw_request.app.state.serving_models
    return models.list()


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=GENERATES)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
    chat: OpenAIServingChat = raw_request.app.state.serving_chat
    return await _answer(raw_request, chat.create(request))


@router.post("/completions", response_model=CompletionResponse, responses=GENERATES)
async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
    completion: OpenAIServingCompletion = raw_request.app.state.serving_completion
    return await _answer(raw_request, completion.create(request))
