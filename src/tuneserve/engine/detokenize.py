"""Token ids -> text deltas for one request: incremental decoding and stop strings.

Engine-independent: an engine feeds each generated token to `OutputText.add()` and sends
on whatever text comes back. Two things are held back until they resolve:
- an incomplete UTF-8 character (the decoded text ends in U+FFFD while its bytes are
  spread over several tokens);
- a tail that could be the start of a stop string ("\\nUs" while "\\nUser:" is a stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to

# Prompt tokens decoded before the first generated token so that tokenizers which drop a
# leading space at the start of a decode (SentencePiece "▁") keep it in the output.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a growing token list and returns only the new suffix each time.

    Decodes a short window, not the whole output: `prefix` is text already emitted
    (ids[prefix_offset:read_offset]); the delta is what decoding up to the newest token
    adds to it. (The offsets scheme of HF text-generation-inference and vLLM.)
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        context_tokens: int = CONTEXT_TOKENS,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-context_tokens:]) if context_tokens else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special,
            # Clean-up rewrites text already emitted (" ." -> "."); deltas must only append.
            clean_up_tokenization_spaces=False,
        )
        return text

    def _advance(self, *, force: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) and not force:
            return ""  # e.g. a skipped special token: nothing new yet
        if text.endswith(REPLACEMENT_CHAR) and not force:
            return ""  # wait for the rest of the character's bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def add(self, token_id: int) -> str:
        """The text `token_id` completes; "" while a character is incomplete."""
        self._ids.append(token_id)
        return self._advance(force=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(force=True)


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(hits) if hits else None


class StopMatcher:
    """Cuts text at the first stop string; holds back tails that may become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self._pending = ""  # text not yet emitted: a possible start of a stop string

    def feed(self, text: str, *, active: bool = True) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped). After stopped, the request is over.

        With active False (min_tokens not reached) stop strings are not honoured, but
        prefixes are still held so a stop completed later is caught whole.
        """
        pending = self._pending + text
        if active:
            hit = _first_stop(pending, self.stops)
            if hit is not None:
                self._pending = ""
                return pending[:hit], True
        keep = len(pending) - _partial_stop_len(pending, self.stops)
        self._pending = pending[keep:]
        return pending[:keep], False

    def flush(self) -> str:
        """The held tail, at a finish that is not a stop string (it never became one)."""
        pending, self._pending = self._pending, ""
        return pending


class OutputText:
    """One request's output text: detokenized token by token, cut at stop strings."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(stop)

    def add(self, token_id: int, *, stop_active: bool = True) -> tuple[str, bool]:
        """(text to emit now, whether a stop string ended the request)."""
        return self._stops.feed(self._detokenizer.add(token_id), active=stop_active)

    def finish(self) -> tuple[str, bool]:
        """Release everything held back when the request ends for another reason."""
        text, stopped = self._stops.feed(self._detokenizer.flush())
        if stopped:
            return text, True
        return text + self._stops.flush(), False
