"""From a request's sampled tokens to its deltas, and when it ends: one set of rules for every
engine.

A request ends with "stop" at a stop string, when its constraint is complete (its grammar
allows nothing more), or at an EOS token (unless ignore_eos; not before min_tokens); with
"length" once it has `max_tokens` tokens. Engines decide who runs and compute the logits;
what a token means for the request is decided here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tuneserve.engine.detokenize import OutputText
from tuneserve.engine.sampling import SamplingState
from tuneserve.engine.structured import GrammarCompiler
from tuneserve.engine.types import FinishReason, GenerationRequest, StreamDelta, TokenLogprob
from tuneserve.models.types import ServedModel

logger = logging.getLogger(__name__)


def eos_token_ids(served: ServedModel) -> tuple[int, ...]:
    """The served model's EOS ids (its generation config's), else the tokenizer's."""
    if served.eos_token_ids:
        return tuple(int(i) for i in served.eos_token_ids)
    eos = getattr(served.tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)


def invalid_prompt(
    request: GenerationRequest, vocab_size: int, max_model_len: int | None = None
) -> str | None:
    """Why this request's prompt cannot run, or None (failing it alone keeps the others)."""
    ids = request.prompt_ids
    if not ids:
        return f"request {request.request_id}: the prompt is empty"
    if max_model_len is not None and len(ids) >= max_model_len:
        return (
            f"request {request.request_id}: the prompt has {len(ids)} tokens; "
            f"this engine's max_model_len is {max_model_len} "
            "(the prompt plus at least one generated token)"
        )
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        return (
            f"request {request.request_id}: prompt token id {bad} is outside the "
            f"vocabulary (0..{vocab_size - 1})"
        )
    return None


class RequestOutput:
    """One running request's sampling state, text and finish decision."""

    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: Any,
        *,
        eos_token_ids: frozenset[int],
        max_tokens: int,
        device: str | torch.device,
        grammars: GrammarCompiler | None,
    ) -> None:
        """Raises ConstraintError when the request's constraint cannot be compiled."""
        self.request = request
        self.max_tokens = max_tokens
        self.sampling = SamplingState.create(request.params, request.prompt_ids, device, grammars)
        self.text = OutputText(tokenizer, request.prompt_ids, request.params.stop)
        self._eos = eos_token_ids

    @property
    def num_generated(self) -> int:
        return self.sampling.num_generated

    def add(self, token: int, logprob: TokenLogprob | None = None) -> StreamDelta:
        """Account one generated token; the delta to send (with finish_reason when it ends)."""
        params = self.request.params
        self.sampling.record(token)
        reached_min = self.num_generated >= params.min_tokens
        text, stopped = self.text.add(token, stop_active=reached_min)
        finish: FinishReason | None = None
        if stopped:
            finish = "stop"
        elif self.sampling.constraint_done:
            finish = "stop"
        elif token in self._eos and not params.ignore_eos and reached_min:
            finish = "stop"
        elif self.num_generated >= self.max_tokens:
            finish = "length"
        elif (error := self.sampling.constraint_error) is not None:
            # cannot happen while masks are applied; ending beats generating unconstrained
            logger.error("request %s: its constraint failed: %s", self.request.request_id, error)
            finish = "stop"
        if finish is not None and not stopped:
            tail, stopped = self.text.finish()
            text += tail
            finish = "stop" if stopped else finish
        return StreamDelta(
            text=text,
            token_ids=[token],
            logprobs=None if logprob is None else [logprob],
            finish_reason=finish,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=self.num_generated,
        )

    def finish(self, reason: FinishReason) -> StreamDelta:
        """The last delta of a request ended from outside (cancelled, say)."""
        return StreamDelta(
            text="",
            finish_reason=reason,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=self.num_generated,
        )
