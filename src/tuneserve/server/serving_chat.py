"""POST /v1/chat/completions: render the conversation, run n choices, answer whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from tuneserve.engine.types import StreamDelta
from tuneserve.server.errors import ServiceUnavailableError
from tuneserve.server.generation import GenerationService
from tuneserve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    DeltaMessage,
    FinishReason,
    UsageInfo,
    random_id,
)
from tuneserve.server.streaming import collect_choices, merge_streams


def checked_finish(delta: StreamDelta) -> FinishReason:
    """The OpenAI finish_reason of a final delta; an engine-side cancel is an outage."""
    if delta.finish_reason == "cancelled":
        raise ServiceUnavailableError(
            "The generation was cancelled by the server (it is shutting down). Retry.",
            code="generation_cancelled",
        )
    assert delta.finish_reason is not None
    return delta.finish_reason


def ensure_running(service: GenerationService) -> None:
    """Fail fast with 503 rather than queue work for an engine that is not running."""
    if not service.engine.is_running:
        raise ServiceUnavailableError(
            "The engine is not running (the server is starting or shutting down). Retry.",
            code="engine_not_running",
        )


@dataclass(frozen=True, slots=True)
class _Job:
    id: str
    created: int
    model: str
    prompt_tokens: int
    streams: list[AsyncIterator[StreamDelta]]


class OpenAIServingChat:
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def create(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A whole response, or (stream=True) the JSON of each chunk. Raises APIError."""
        service = self.service
        await service.resolve_model(request.model)  # 404 (or an on-demand load) first
        ensure_running(service)
        prompt_ids = service.render_chat([m.to_template() for m in request.messages])
        max_tokens = service.check_length(
            prompt_ids, request.requested_max_tokens, param="messages"
        )
        job = _Job(
            id=random_id("chatcmpl"),
            created=int(time.time()),
            model=request.model,
            prompt_tokens=len(prompt_ids),
            streams=[
                service.stream(request.model, prompt_ids, params)
                for params in request.to_sampling_params(max_tokens)
            ],
        )
        if request.stream:
            return self._chunks(job, include_usage=request.include_usage)
        return await self._whole(job)

    async def _whole(self, job: _Job) -> ChatCompletionResponse:
        results = await collect_choices(job.streams)
        choices = [
            ChatCompletionChoice(
                index=index,
                message=ChatResponseMessage(content=text),
                finish_reason=checked_finish(final),
            )
            for index, (text, final) in enumerate(results)
        ]
        completion_tokens = sum(final.completion_tokens for _, final in results)
        return ChatCompletionResponse(
            id=job.id,
            created=job.created,
            model=job.model,
            choices=choices,
            usage=UsageInfo.of(job.prompt_tokens, completion_tokens),
        )

    async def _chunks(self, job: _Job, *, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            body = ChatCompletionChunk(
                id=job.id, created=job.created, model=job.model, choices=choices, usage=usage
            )
            # OpenAI sends "usage": null in every chunk only when usage was asked for.
            return body.model_dump_json(exclude=None if include_usage else {"usage"})

        for index in range(len(job.streams)):
            role = DeltaMessage(role="assistant", content="")
            yield chunk([ChatCompletionStreamChoice(index=index, delta=role)])
        completion_tokens = 0
        async with aclosing(merge_streams(job.streams)) as merged:
            async for index, delta in merged:
                if delta.text:
                    content = DeltaMessage(content=delta.text)
                    yield chunk([ChatCompletionStreamChoice(index=index, delta=content)])
                if delta.finish_reason is not None:
                    reason = checked_finish(delta)
                    completion_tokens += delta.completion_tokens
                    yield chunk(
                        [
                            ChatCompletionStreamChoice(
                                index=index, delta=DeltaMessage(), finish_reason=reason
                            )
                        ]
                    )
        if include_usage:
            yield chunk([], UsageInfo.of(job.prompt_tokens, completion_tokens))
