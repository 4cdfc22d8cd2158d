"""Exceptions a user can act on. Each message names the file, field or value and what is accepted.

TuneserveError
 ├── ModelLoadError        the base model (path or hub id) cannot be found or loaded
 ├── AdapterError          one adapter is unusable: wrong base, bad file, unsupported PEFT type
 ├── WorkspaceError        a --workspace folder does not have the AI Toolkit layout
 ├── UnknownAdapterError   a request names an adapter the engine does not serve
 ├── EngineError           generation failed inside the engine (e.g. the model forward raised)
 └── RegistryError         an adapter load or unload asked of a server cannot be done (400)
      └── AdapterNotLoadedError  the unload names an adapter that is not served (404)
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


class EngineError(TuneserveError):
    """Raised by a request's stream when the engine could not finish it (the model failed).

    The engine itself keeps serving; only the requests in the failed step are ended.
    """


class RegistryError(TuneserveError):
    """Raised by the server's adapter registry; `param` names the request field at fault."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterNotLoadedError(RegistryError):
    pass


# --- deploy/ (provision, deploy, endpoint, status, logs, stop) --------------------------------
# TuneserveError
#  └── DeployError              anything `tuneserve init/provision/deploy/...` can act on
#       ├── InfraFileError      an infra/ JSON file is malformed or invalid (file, line, field)
#       ├── NotProvisionedError infra/inference.config.json is missing or incomplete
#       ├── ProviderError       the provider (local processes, Azure) refused or failed
#       └── DeployFailedError   the new revision never became ready; the previous one still serves


class DeployError(TuneserveError):
    """Base of the errors of the provision/deploy workflow."""


class InfraFileError(DeployError):
    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class NotProvisionedError(DeployError):
    pass


class ProviderError(DeployError):
    pass


class DeployFailedError(DeployError):
    def __init__(self, message: str, *, previous_revision: str | None = None) -> None:
        super().__init__(message)
        self.previous_revision = previous_revision
