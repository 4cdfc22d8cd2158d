"""A request's constraint as an llguidance grammar, and the check the server runs on it before
a request reaches an engine. Kept apart from the token masks (engine/structured.py) so that the
server's protocol checks import no torch.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher

from tuneserve.engine.types import Constraint
from tuneserve.errors import TuneserveError

_JSON_OPTIONS: Any = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class ConstraintError(TuneserveError):
    """A schema, regex or grammar the grammar engine cannot enforce; says what and why."""


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar of `constraint` (not yet checked)."""
    if constraint.kind == "json_schema":
        try:
            return LLMatcher.grammar_from_json_schema(constraint.spec, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise ConstraintError(f"the JSON schema is not a JSON object: {exc}") from None
    if constraint.kind == "regex":
        return LLMatcher.grammar_from_regex(constraint.spec)
    if constraint.kind == "choice":
        choices = json.loads(constraint.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return LLMatcher.grammar_from_lark(constraint.spec)


def check_constraint(constraint: Constraint) -> None:
    """Raise ConstraintError naming what the grammar engine refuses (e.g. an unsupported
    JSON-schema keyword or format); cheap, needs no tokenizer."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar_of(constraint), None)
    if is_error:
        raise ConstraintError("; ".join(messages))
