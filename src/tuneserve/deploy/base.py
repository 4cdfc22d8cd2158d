"""What every provider does, and the pieces they share (name resolution, results)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from tuneserve.deploy import naming
from tuneserve.deploy.build import write_build
from tuneserve.deploy.infra import (
    BUILD_DIR,
    FinetuningConfig,
    InferenceConfig,
    InferenceParameters,
    InfraPaths,
)
from tuneserve.deploy.sync import SyncTarget, workspace_files

# parameter -> the finetuning.config.json key that names the same resource
FINETUNING_KEYS = {"storageAccountName": "STORAGE_ACCOUNT_NAME", "fileShareName": "FILE_SHARE_NAME"}


@dataclass
class ProvisionRequest:
    subscription_id: str
    resource_group: str
    parameters: InferenceParameters
    finetuning: FinetuningConfig | None = None
    location: str | None = None  # for creating a missing resource group (azure)
    port: int | None = None  # local: the endpoint's port
    share_root: Path | None = None  # local: the folder standing in for the storage account

    def explicit_names(self) -> dict[str, str]:
        """Names set in the parameters file or taken from the fine-tuning step (not derived)."""
        names = {k: v for k, v in self.parameters.names().items() if v is not None}
        if self.finetuning is not None:
            for param, key in FINETUNING_KEYS.items():
                value = getattr(self.finetuning, key)
                if param not in names and value:
                    names[param] = value
        return names

    def resolved_names(self) -> dict[str, str]:
        """Every resource name: explicit, else the template's derived default (approximation)."""
        derived = naming.derived_names(self.subscription_id, self.resource_group)
        return {**derived.__dict__, **self.explicit_names()}


@dataclass
class DeployResult:
    revision: str
    endpoint: str
    sync_summary: str
    replicas: int = 1


@dataclass
class StatusReport:
    provider: str
    app: str
    endpoint: str
    revision: str | None
    ready: bool
    replicas: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[str] | None = None  # /v1/models minus the base, None if unreachable
    models: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Provider(Protocol):
    name: str

    def provision(self, request: ProvisionRequest) -> InferenceConfig: ...
    def deploy(
        self, *, timeout: float | None, replicas: int | None, prune: bool
    ) -> DeployResult: ...
    def status(self, *, api_key: str | None = None) -> StatusReport: ...
    def logs(self, *, tail: int, follow: bool) -> Iterator[str]: ...
    def stop(self) -> str: ...
    def share_target(self) -> SyncTarget: ...
    def replica_urls(self) -> list[str]: ...


def deploy_sources(paths: InfraPaths) -> dict[str, Path]:
    """What deploy syncs: the workspace's files plus the tuneserve build under .tuneserve-build/."""
    sources = workspace_files(paths.workspace)
    build = write_build(paths.state / "build")
    sources.update({f"{BUILD_DIR}/{rel}": p for rel, p in build.items()})
    return sources


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)
