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
from tuneserve.deploy.keys import EndpointKeys
from tuneserve.deploy.sync import HashCache, SyncResult, SyncTarget, sync, workspace_files

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
    keys: EndpointKeys | None = None  # the endpoint's keys, kept by the platform as secrets
    # custom names from infra/provision/finetuning.parameters.json (infra.load_finetuning_names)
    finetuning_names: dict[str, str] = field(default_factory=dict)

    def finetuning_in_scope(self) -> bool:
        """Whether this request provisions into the fine-tuning step's subscription and resource
        group (as infra/finetuning.config.json names them)."""
        ft = self.finetuning
        return (
            ft is not None
            and ft.SUBSCRIPTION_ID == self.subscription_id
            and ft.RESOURCE_GROUP_NAME == self.resource_group
        )

    def finetuning_defaults(self) -> dict[str, str]:
        """The fine-tuning step's names, the defaults for null names: the storage account and
        share of infra/finetuning.config.json (its deployment's outputs), else the custom names
        of infra/provision/finetuning.parameters.json."""
        names = dict(self.finetuning_names)
        if self.finetuning is not None:
            for param, key in FINETUNING_KEYS.items():
                if value := getattr(self.finetuning, key):
                    names[param] = value
        return names

    def explicit_names(self, *, require_same_scope: bool = False) -> dict[str, str]:
        """Names set in the parameters file or taken from the fine-tuning step (not derived).

        With `require_same_scope` (Azure) the fine-tuning step's names are taken only when this
        request provisions into its subscription and resource group: storage account names are
        global, so reusing one from elsewhere would fail or reach another subscription's
        account; the local provider reuses them by name wherever it runs."""
        names = {k: v for k, v in self.parameters.names().items() if v is not None}
        if require_same_scope and not self.finetuning_in_scope():
            return names
        for param, value in self.finetuning_defaults().items():
            names.setdefault(param, value)
        return names

    def resolved_names(self, *, require_same_scope: bool = False) -> dict[str, str]:
        """Every resource name: explicit, else the template's derived default (approximation)."""
        derived = naming.derived_names(self.subscription_id, self.resource_group)
        return {**derived.__dict__, **self.explicit_names(require_same_scope=require_same_scope)}


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
        self,
        *,
        timeout: float | None,
        replicas: int | None,
        prune: bool,
        force: bool = False,
        include_model_cache: bool | None = None,
    ) -> DeployResult: ...
    def status(self, *, api_key: str | None = None) -> StatusReport: ...
    def logs(self, *, tail: int, follow: bool, revision: str | None = None) -> Iterator[str]: ...
    def stop(self) -> str: ...
    def share_target(self) -> SyncTarget: ...
    def replica_urls(self) -> list[str]: ...


def deploy_sources(paths: InfraPaths) -> dict[str, Path]:
    """What deploy syncs: the workspace's files plus the tuneserve build under .tuneserve-build/."""
    sources = workspace_files(paths.workspace)
    build = write_build(paths.state / "build")
    sources.update({f"{BUILD_DIR}/{rel}": p for rel, p in build.items()})
    return sources


def sync_to_share(
    paths: InfraPaths,
    target: SyncTarget,
    *,
    prune: bool = False,
    force: bool = False,
    include_model_cache: bool | None = None,
    console: Console | None = None,
) -> SyncResult:
    """Every provider's first deploy step (one place, so the container start rehearsal lays out
    the share exactly as deploy does): the workspace and the tuneserve build to the share.
    The rules (what is kept, model-cache/) are sync.sync's."""
    return sync(
        deploy_sources(paths),
        target,
        hash_cache=HashCache(paths.state / "hashes.json"),
        prune=prune,
        keep=[BUILD_DIR],
        force=force,
        include_model_cache=include_model_cache,
        console=console,
    )


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)
