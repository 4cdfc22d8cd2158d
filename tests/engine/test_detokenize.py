"""Incremental detokenizing and stop strings, with a real (locally trained) tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine.tiny import CORPUS
from tuneserve.engine.detokenize import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    OutputText,
    StopMatcher,
)

TEXTS = sorted(set(CORPUS))


def feed(tokenizer: Any, text: str, prompt: str = "") -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt) if prompt else [])
    deltas = [detok.add(t) for t in tokenizer.encode(text)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_text_and_never_hold_a_broken_character(
    tokenizer: Any, text: str
) -> None:
    deltas = feed(tokenizer, text, prompt="Context before: ")
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_a_character_split_over_tokens_is_held_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1, "the test tokenizer should split this emoji into byte tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(t) for t in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_flush_releases_a_dangling_partial_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🙂")
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add(t) for t in ids[:-1])
    assert text == "ok"  # byte-level BPE puts the space in the emoji's first token
    tail = detok.flush()
    assert tail == tokenizer.decode(ids[:-1])[len("ok") :]
    assert tail.startswith(" ") and tail.endswith(REPLACEMENT_CHAR)
    assert detok.flush() == ""


def test_special_tokens_are_not_text(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, [])
    ids = tokenizer.encode("hello")
    out = [detok.add(t) for t in ids] + [detok.add(tokenizer.eos_token_id)]
    assert "".join(out) == "hello"
    assert out[-1] == ""


@pytest.mark.parametrize(
    ("stops", "chunks", "emitted", "stopped"),
    [
        pytest.param(
            ["END"], ["abc", "E", "N", "D", "zzz"], ["abc", "", "", ""], True, id="across-chunks"
        ),
        pytest.param(["END"], ["abE", "Nx", "y"], ["ab", "ENx", "y"], False, id="prefix-released"),
        pytest.param(["bb", "ab"], ["xxabb"], ["xx"], True, id="earliest-wins"),
        pytest.param(["\n\n"], ["\n\nhi"], [""], True, id="at-start"),
        pytest.param(["x"], ["ax", "b"], ["a"], True, id="one-char"),
        pytest.param([""], ["abc"], ["abc"], False, id="empty-stop-ignored"),
    ],
)
def test_stop_matcher(
    stops: list[str], chunks: list[str], emitted: list[str], stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    out: list[str] = []
    hit = False
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        out.append(text)
        if hit:
            break
    assert out == emitted
    assert hit is stopped


def test_stop_matcher_inactive_holds_prefixes_and_flush_returns_them() -> None:
    matcher = StopMatcher(["END"])
    # Before min_tokens a whole stop string passes through...
    assert matcher.feed("xEND", active=False) == ("xEND", False)
    # ...but a possible start is still held, so a stop completed later is caught whole.
    assert matcher.feed("EN", active=False) == ("", False)
    assert matcher.feed("D!", active=True) == ("", True)
    other = StopMatcher(["END"])
    assert other.feed("aE") == ("a", False)
    assert other.flush() == "E"


def test_output_text_cuts_at_a_stop_string_spanning_tokens(tokenizer: Any) -> None:
    text = "User: hello there! Assistant: hi, how can I help you today?"
    ids = tokenizer.encode(text)
    out = OutputText(tokenizer, [], stop=("Assistant:",))
    emitted: list[str] = []
    used = 0
    for token_id in ids:
        used += 1
        delta, stopped = out.add(token_id)
        emitted.append(delta)
        if stopped:
            break
    assert "".join(emitted) == "User: hello there! "
    # It stopped at the token that completed the stop string, not later.
    assert "Assistant:" not in tokenizer.decode(ids[: used - 1])
    assert "Assistant:" in tokenizer.decode(ids[:used])


def test_output_text_stop_inside_one_token(tokenizer: Any) -> None:
    ids = tokenizer.encode("hello there")
    out = OutputText(tokenizer, [], stop=("ell",))
    results = [out.add(t) for t in ids]
    first_stop = next(i for i, (_, stopped) in enumerate(results) if stopped)
    assert "".join(text for text, _ in results[: first_stop + 1]) == "h"


def test_output_text_finish_releases_held_tail(tokenizer: Any) -> None:
    ids = tokenizer.encode("abc Us")
    out = OutputText(tokenizer, [], stop=("User:",))
    emitted = "".join(out.add(t)[0] for t in ids)
    assert emitted == "abc "
    assert out.finish() == ("Us", False)
