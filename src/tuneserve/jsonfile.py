"""Reading a JSON object from a file, with what is wrong said in words a user can act on.

Both the AI Toolkit's infra files and PEFT's adapter_config.json go through here, so a
trailing comma reads the same wherever it is: the line and column, then the parser's words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonFileProblem(ValueError):
    """What is wrong with the file, without its name (the caller's error names it)."""


def read_json_object(path: Path) -> tuple[dict[str, Any], str]:
    """The file's top-level object and its text; JsonFileProblem when it cannot be one."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JsonFileProblem("file not found") from None
    except OSError as exc:
        raise JsonFileProblem(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise JsonFileProblem(f"cannot read: not UTF-8 text ({exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonFileProblem(
            f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise JsonFileProblem(f"expected a JSON object at the top, found {kind_of(data)}")
    return data, text


def kind_of(value: Any) -> str:
    """A JSON value's kind as a sentence says it: 'an array', 'a string', 'null'."""
    return {
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        dict: "an object",
    }.get(type(value), "null" if value is None else type(value).__name__)
