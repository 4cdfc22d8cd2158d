"""What the chat and completions handlers share: the job of one request (its ids, its choices'
streams) and how it becomes a response or a chunk, the finish check and the running check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from tuneserve.engine.types import StreamDelta
from tuneserve.server.errors import ServiceUnavailableError
from tuneserve.server.generation import GenerationService
from tuneserve.server.protocol import FinishReason, UsageInfo

Body = TypeVar("Body", bound=BaseModel)


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
class Job:
    """One request's generation: n choices (or prompts x n) streaming at once."""

    id: str
    created: int
    model: str
    prompt_tokens: int  # each prompt counted once, however many choices it has
    streams: list[AsyncIterator[StreamDelta]]

    def body(self, cls: type[Body], choices: Sequence[Any], usage: UsageInfo | None) -> Body:
        """A response or chunk of this job: the same id, time and model in every one."""
        return cls(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def whole(self, cls: type[Body], choices: Sequence[Any], finals: Sequence[StreamDelta]) -> Body:
        """The non-streaming response, usage counted from each choice's final delta."""
        return self.body(cls, choices, self.usage(sum(f.completion_tokens for f in finals)))

    def chunk(
        self,
        cls: type[BaseModel],
        choices: Sequence[Any],
        usage: UsageInfo | None = None,
        *,
        include_usage: bool,
    ) -> str:
        """One streamed chunk's JSON. OpenAI sends "usage": null in every chunk only when
        usage was asked for."""
        body = self.body(cls, choices, usage)
        return body.model_dump_json(exclude=None if include_usage else {"usage"})

    def usage(self, completion_tokens: int) -> UsageInfo:
        return UsageInfo.of(self.prompt_tokens, completion_tokens)
