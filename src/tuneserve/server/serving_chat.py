"""POST /v1/chat/completions: render the conversation, run n choices, answer whole or streamed.

Tool calls (tools.py) and logprobs (logprobs.py) are read from each choice's deltas here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from tuneserve.engine.types import StreamDelta, TokenLogprob
from tuneserve.server.generation import GenerationService
from tuneserve.server.logprobs import chat_logprobs
from tuneserve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    ChoiceLogprobs,
    DeltaMessage,
    FinishReason,
    UsageInfo,
    random_id,
)
from tuneserve.server.serving_base import Job, checked_finish, ensure_running
from tuneserve.server.streaming import collect_choices, merge_streams
from tuneserve.server.tools import (
    ToolCallReader,
    forced_call_constraint,
    hermes_messages,
    template_knows_tools,
    tool_schemas,
)


@dataclass(frozen=True, slots=True)
class _Job(Job):
    request: ChatCompletionRequest


def _finish(delta: StreamDelta, reader: ToolCallReader) -> FinishReason:
    reason = checked_finish(delta)
    return "tool_calls" if reader.calls and reason == "stop" else reason


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
        messages = [m.to_template() for m in request.messages]
        tools = None
        if request.tools:
            if template_knows_tools(service.served.tokenizer):
                tools = tool_schemas(request.tools)
            else:
                messages = hermes_messages(messages, request.tools)
        prompt_ids = service.render_chat(messages, tools)
        max_tokens = service.check_length(
            prompt_ids, request.requested_max_tokens, param="messages"
        )
        choices = request.to_sampling_params(max_tokens, forced_call_constraint(request))
        service.check_logit_bias(choices[0])
        job = _Job(
            id=random_id("chatcmpl"),
            created=int(time.time()),
            model=request.model,
            prompt_tokens=len(prompt_ids),
            streams=[service.stream(request.model, prompt_ids, params) for params in choices],
            request=request,
        )
        if request.stream:
            return self._chunks(job, include_usage=request.include_usage)
        return await self._whole(job)

    async def _whole(self, job: _Job) -> ChatCompletionResponse:
        results = await collect_choices(job.streams)
        choices = []
        for index, (text, final, entries) in enumerate(results):
            reader = ToolCallReader(job.request)
            content, _ = reader.feed(text)
            tail, _ = reader.end()
            content += tail
            choices.append(
                ChatCompletionChoice(
                    index=index,
                    message=ChatResponseMessage(
                        content=content or None if reader.calls or reader.forced else content,
                        tool_calls=reader.calls,
                    ),
                    logprobs=self._logprobs(job, entries),
                    finish_reason=_finish(final, reader),
                )
            )
        return job.whole(ChatCompletionResponse, choices, [final for _, final, _ in results])

    async def _chunks(self, job: _Job, *, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            return job.chunk(ChatCompletionChunk, choices, usage, include_usage=include_usage)

        readers = [ToolCallReader(job.request) for _ in job.streams]
        for index in range(len(job.streams)):
            role = DeltaMessage(role="assistant", content="")
            yield chunk([ChatCompletionStreamChoice(index=index, delta=role)])
        completion_tokens = 0
        async with aclosing(merge_streams(job.streams)) as merged:
            async for index, delta in merged:
                reader = readers[index]
                content, calls = reader.feed(delta.text)
                if delta.finish_reason is not None:
                    tail, last_calls = reader.end()
                    content, calls = content + tail, calls + last_calls
                logprobs = self._logprobs(job, delta.logprobs or [])
                if content or calls or logprobs:
                    message = DeltaMessage(content=content or None, tool_calls=calls or None)
                    yield chunk(
                        [ChatCompletionStreamChoice(index=index, delta=message, logprobs=logprobs)]
                    )
                if delta.finish_reason is not None:
                    reason = _finish(delta, reader)
                    completion_tokens += delta.completion_tokens
                    yield chunk(
                        [
                            ChatCompletionStreamChoice(
                                index=index, delta=DeltaMessage(), finish_reason=reason
                            )
                        ]
                    )
        if include_usage:
            yield chunk([], job.usage(completion_tokens))

    def _logprobs(self, job: _Job, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if not job.request.logprobs or not entries:
            return None
        return chat_logprobs(entries, self.service.token_texts)
