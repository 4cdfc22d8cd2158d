"""The engine's logprobs in OpenAI's two shapes: chat (`content` entries with bytes and
`top_logprobs`) and completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from tuneserve.engine.types import TokenLogprob
from tuneserve.server.protocol import (
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    TopLogprob,
)

# A token the constraint forbids has logprob -inf, which JSON cannot carry (vLLM's stand-in).
FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


class TokenTexts:
    """Token id -> its text, as the tokenizer decodes it alone (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id], clean_up_tokenization_spaces=False))


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> ChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = texts.text(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode()))

    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                **top(entry.token_id, entry.logprob).model_dump(),
                top_logprobs=[top(t, v) for t, v in entry.top],
            )
            for entry in entries
        ]
    )


def completion_logprobs(
    entries: Sequence[TokenLogprob], texts: TokenTexts, offset: int
) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the choice's text."""
    result = CompletionLogprobs()
    for entry in entries:
        text = texts.text(entry.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(_finite(entry.logprob))
        result.text_offset.append(offset)
        offset += len(text)
    result.top_logprobs = [{texts.text(t): _finite(v) for t, v in e.top} for e in entries]
    return result
