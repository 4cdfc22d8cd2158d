"""The one path from a request (model name, messages or prompt, sampling) to engine deltas.

Both the OpenAI routes and the Gradio UI call this in-process, so they validate and count
the same way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from jinja2 import TemplateError

from tuneserve.engine.base import Engine
from tuneserve.engine.types import GenerationRequest, SamplingParams, StreamDelta
from tuneserve.models.types import ServedModel
from tuneserve.server.errors import InvalidRequestError, ModelNotFoundError
from tuneserve.server.lifecycle import Lifecycle, draining_error
from tuneserve.server.logprobs import TokenTexts


@dataclass(frozen=True)
class FinishedRequest:
    """One request's end as the metrics count it (finished, or "cancelled")."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str


class GenerationObserver(Protocol):
    """Hooks for metrics; server/metrics.py implements them."""

    def first_token(self, model: str, seconds: float) -> None: ...

    def request_finished(self, done: FinishedRequest) -> None: ...


class AdapterFinder(Protocol):
    """Loads adapters on demand by name (server/adapter_registry.py implements it)."""

    async def find(self, name: str) -> bool:
        """Serve `name` if an adapter of that name can be found; True when it is served."""
        ...

    def where_looked(self, name: str) -> str:
        """For the 404: where an adapter of that name would have been found."""
        ...


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        served: ServedModel,
        observer: GenerationObserver | None = None,
        finder: AdapterFinder | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.engine = engine
        self.served = served
        self.observer = observer
        self.finder = finder
        self.lifecycle = lifecycle or Lifecycle()
        self.token_texts = TokenTexts(served.tokenizer)

    # -- names ---------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """The base model first, then every served adapter."""
        return [self.served.base_name, *self.engine.adapter_names]

    def resolve_adapter(self, model: str) -> str | None:
        """Map a request's `model` to an adapter name (None = the base) or raise 404."""
        if model == self.served.base_name:
            return None
        if model in self.engine.adapters:
            return model
        raise ModelNotFoundError(model, self.model_ids())

    async def resolve_model(self, model: str) -> str | None:
        """As resolve_adapter, loading an adapter that is not served yet but can be found
        (LoRAX-style, by name); the 404 says where it looked."""
        if model == self.served.base_name or model in self.engine.adapters:
            return self.resolve_adapter(model)
        if self.finder is None:
            raise ModelNotFoundError(model, self.model_ids())
        if await self.finder.find(model):
            return self.resolve_adapter(model)
        raise ModelNotFoundError(model, self.model_ids(), hint=self.finder.where_looked(model))

    # -- prompts -------------------------------------------------------------------------
    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of the whole conversation through the tokenizer's chat template (with
        `tools` for a template that renders them)."""
        if not messages:
            raise InvalidRequestError(
                "'messages' must hold at least one message.", param="messages"
            )
        try:
            text = self.served.tokenizer.apply_chat_template(
                list(messages), tools=tools, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:
            # Templates reject conversations they cannot render ("roles must alternate
            # user/assistant/..."): the user's to fix, so a 400 naming the template's reason.
            raise InvalidRequestError(
                f"The model's chat template rejected the messages: {exc}", param="messages"
            ) from None
        # The template already wrote any BOS; encoding must not add a second one.
        return list(self.served.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, prompt: str | Sequence[int], *, param: str = "prompt") -> list[int]:
        """Token ids of a text prompt (special tokens added as the tokenizer does), or the ids
        given, checked against the vocabulary."""
        if isinstance(prompt, str):
            return list(self.served.tokenizer.encode(prompt))
        ids = list(prompt)
        vocab = self.vocab_size()
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Token id {bad} in '{param}' is out of range: ids must be in [0, {vocab}).",
                param=param,
            )
        return ids

    def check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.vocab_size()
        bad = next((t for t, _ in params.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Token id {bad} in 'logit_bias' is out of range: ids must be in [0, {vocab}).",
                param="logit_bias",
            )

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.served.tokenizer.decode(list(token_ids)))

    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def check_length(self, prompt_ids: Sequence[int], max_tokens: int | None, *, param: str) -> int:
        """Validate the prompt against the context; return the max_tokens to use."""
        limit = self.served.max_model_len
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequestError("The prompt is empty.", param=param)
        if n >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{n} tokens. Shorten the {param}.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - n
        if n + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                f"Reduce max_tokens to at most {limit - n}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    # -- generation ----------------------------------------------------------------------
    async def stream(
        self, model: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[StreamDelta, None]:
        """Deltas of one choice. Closing the iterator early cancels the generation."""
        adapter = self.resolve_adapter(model)
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt_ids=tuple(prompt_ids),
            params=params,
            adapter=adapter,
        )
        started = time.perf_counter()
        # Submit first: a request the engine refuses never started, so it is not reported.
        engine_stream = self.engine.submit(request)
        first = True
        last: StreamDelta | None = None
        try:
            async for delta in engine_stream:
                if first and delta.token_ids and self.observer:
                    self.observer.first_token(model, time.perf_counter() - started)
                    first = False
                last = delta
                yield delta
        finally:
            engine_stream.cancel()
            if self.observer:
                self.observer.request_finished(
                    FinishedRequest(
                        model,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=last.completion_tokens if last else 0,
                        seconds=time.perf_counter() - started,
                        finish_reason=(
                            last.finish_reason if last and last.finish_reason else "cancelled"
                        ),
                    )
                )

    async def chat_stream(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams,
        *,
        fit: bool = False,
    ) -> AsyncGenerator[StreamDelta, None]:
        """Convenience for the UI: render, check length, stream one choice. (API requests are
        refused and counted while draining by DrainMiddleware; the UI's are here.)

        With `fit`, max_tokens is an upper bound, not a demand: it is capped at the room the
        context leaves, so a long conversation still gets a (shorter) reply rather than an
        error. A prompt that alone overflows the context still raises.
        """
        if self.lifecycle.draining:
            raise draining_error()
        with self.lifecycle.track():
            async for delta in self._chat_stream(model, messages, params, fit=fit):
                yield delta

    async def _chat_stream(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams,
        *,
        fit: bool,
    ) -> AsyncGenerator[StreamDelta, None]:
        await self.resolve_model(model)
        prompt_ids = self.render_chat(messages)
        if fit:
            room = self.check_length(prompt_ids, None, param="messages")
            max_tokens = min(params.max_tokens, room)
        else:
            max_tokens = self.check_length(prompt_ids, params.max_tokens, param="messages")
        if max_tokens != params.max_tokens:
            params = replace(params, max_tokens=max_tokens)
        async for delta in self.stream(model, prompt_ids, params):
            yield delta
