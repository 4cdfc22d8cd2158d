"""Plain data that crosses the engine boundary: what to generate and what comes back.

The engine speaks token ids in and text deltas out; it never sees HTTP or pydantic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]
AdapterState = Literal["hot", "cpu", "disk"]
ConstraintKind = Literal["json_schema", "regex", "choice", "lark"]


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match, enforced token by token (engine/structured.py).

    `spec` is the JSON schema's text (json_schema), a regular expression (regex), a JSON list
    of strings (choice) or a Lark grammar in llguidance's dialect (lark).
    """

    kind: ConstraintKind
    spec: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request (one choice).

    temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 mean "off".
    `stop` strings are matched on decoded text and never appear in the output.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    # OpenAI's: subtracted per occurrence / once from the logits of generated tokens
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely
    constraint: Constraint | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate. `adapter` None means the bare base model."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability and the `top` alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class StreamDelta:
    """What one request produced since its previous delta.

    `text` is the newly decoded text (stop strings already cut out; may be "" while
    a partial stop match or an incomplete UTF-8 sequence is held back).
    `completion_tokens` is cumulative, counted exactly (tokens actually generated,
    including a token that completed a stop string). The last delta of a request has
    `finish_reason` set; no delta follows it. `logprobs` has one entry per token of
    `token_ids` when the request asked for them.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def distinct_adapters(names: Iterable[str | None]) -> tuple[str, ...]:
    """Each adapter once, in order; None (the base model) left out."""
    return tuple(dict.fromkeys(name for name in names if name is not None))


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float | None = None  # share of the KV budget in use (None: no budget)
    preemptions: int = 0  # running sequences preempted (recomputed later) since the start
    # adapters of running / queued requests (each once, first seen first): routers that place
    # requests where their adapter already runs read them (vLLM's lora_requests_info)
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int | None = None  # adapters that can run in one batch (None: no such bound)


@dataclass(frozen=True, slots=True)
class AdapterUsage:
    """Where one served adapter's weights are, and when a request last used it.

    state: "hot" in an engine slot (or the model); "cpu" weights in CPU memory only;
    "disk" not read yet (or dropped from memory: read again when a request needs it).
    last_used: time.time() when a request last got it (acquired a slot), None if never.
    """

    state: AdapterState
    last_used: float | None
