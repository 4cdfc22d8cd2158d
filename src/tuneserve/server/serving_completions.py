"""POST /v1/completions: one or more raw prompts (text or token ids) x n choices each."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from tuneserve.engine.types import StreamDelta, TokenLogprob
from tuneserve.server.generation import GenerationService
from tuneserve.server.logprobs import completion_logprobs
from tuneserve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from tuneserve.server.serving_base import Job, checked_finish, ensure_running
from tuneserve.server.streaming import collect_choices, merge_streams


@dataclass(frozen=True, slots=True)
class _Job(Job):
    # choice index = prompt index * n + i
    echoes: list[str]  # per choice: the prompt text when echo is on, else ""
    logprobs: bool


class OpenAIServingCompletion:
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """A whole response, or (stream=True) the JSON of each chunk. Raises APIError."""
        service = self.service
        await service.resolve_model(request.model)  # 404 (or an on-demand load) first
        ensure_running(service)
        streams: list[AsyncIterator[StreamDelta]] = []
        echoes: list[str] = []
        prompt_tokens = 0
        for prompt in request.prompts():
            ids = service.encode_prompt(prompt, param="prompt")
            max_tokens = service.check_length(ids, request.max_tokens, param="prompt")
            prompt_tokens += len(ids)
            echo = ""
            if request.echo:
                echo = prompt if isinstance(prompt, str) else service.decode(ids)
            for params in request.to_sampling_params(max_tokens):
                service.check_logit_bias(params)
                streams.append(service.stream(request.model, ids, params))
                echoes.append(echo)
        job = _Job(
            id=random_id("cmpl"),
            created=int(time.time()),
            model=request.model,
            prompt_tokens=prompt_tokens,
            streams=streams,
            echoes=echoes,
            logprobs=request.logprobs is not None,
        )
        if request.stream:
            return self._chunks(job, include_usage=request.include_usage)
        return await self._whole(job)

    async def _whole(self, job: _Job) -> CompletionResponse:
        results = await collect_choices(job.streams)
        choices = [
            CompletionChoice(
                index=index,
                text=echo + text,
                logprobs=self._logprobs(job, entries, len(echo)),
                finish_reason=checked_finish(final),
            )
            for index, ((text, final, entries), echo) in enumerate(
                zip(results, job.echoes, strict=True)
            )
        ]
        return job.whole(CompletionResponse, choices, [final for _, final, _ in results])

    async def _chunks(self, job: _Job, *, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return job.chunk(CompletionResponse, choices, usage, include_usage=include_usage)

        for index, echo in enumerate(job.echoes):
            if echo:
                yield chunk([CompletionChoice(index=index, text=echo)])
        completion_tokens = 0
        offsets = [len(echo) for echo in job.echoes]  # where each choice's next text starts
        async with aclosing(merge_streams(job.streams)) as merged:
            async for index, delta in merged:
                logprobs = self._logprobs(job, delta.logprobs or [], offsets[index])
                if not delta.text and delta.finish_reason is None and logprobs is None:
                    continue
                offsets[index] += len(delta.text)
                reason = None
                if delta.finish_reason is not None:
                    reason = checked_finish(delta)
                    completion_tokens += delta.completion_tokens
                choice = CompletionChoice(
                    index=index, text=delta.text, logprobs=logprobs, finish_reason=reason
                )
                yield chunk([choice])
        if include_usage:
            yield chunk([], job.usage(completion_tokens))

    def _logprobs(
        self, job: _Job, entries: list[TokenLogprob], offset: int
    ) -> CompletionLogprobs | None:
        if not job.logprobs or not entries:
            return None
        return completion_logprobs(entries, self.service.token_texts, offset)
