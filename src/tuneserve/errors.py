"""Exceptions a user can act on. Each message names the file, field or value and what is accepted.

TuneserveError
 ├── ModelLoadError        the base model (path or hub id) cannot be found or loaded
 ├── AdapterError          one adapter is unusable: wrong base, missing/corrupt file, unsupported PEFT type
 ├── WorkspaceError        a --workspace folder does not have the AI Toolkit layout
 └── UnknownAdapterError   a request names an adapter the engine does not serve
"""

from __future__ import annotations


class TuneserveError(Exception):
    """Base of every error tuneserve raises on purpose."""


class ModelLoadError(TuneserveError):
    pass


class AdapterError(TuneserveError):
    def __init__(self, adapter: str, message: str) -> None:
        super().__init__(f"adapter {adapter!r}: {message}")
        self.adapter = adapter


class WorkspaceError(TuneserveError):
    pass


class UnknownAdapterError(TuneserveError):
    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(
            f"unknown adapter {name!r}; served adapters: {', '.join(available) or '(none)'}"
        )
        self.name = name
        self.available = available
