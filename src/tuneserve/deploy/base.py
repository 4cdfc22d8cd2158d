"""What every provider is, and what they share: the provision request, the first deploy step
(the sync), the readiness-failure message, the models an endpoint serves.

A provider is a subclass of `Provider` listed in deploy/registry.py. Its `request_type` (a
`ProvisionRequest` subclass) declares its own `tuneserve provision` options with `option()`;
the CLI makes a flag of each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.console import Console

from tuneserve.deploy import naming
from tuneserve.deploy.build import write_build
from tuneserve.deploy.http import get_json, http_get
from tuneserve.deploy.infra import (
    BUILD_DIR,
    FinetuningConfig,
    InferenceConfig,
    InferenceParameters,
    InfraPaths,
)
from tuneserve.deploy.keys import EndpointKeys
from tuneserve.deploy.shares import SyncTarget
from tuneserve.deploy.sync import HashCache, SyncResult, sync, workspace_files
from tuneserve.errors import DeployError, DeployFailedError, NotProvisionedError

# parameter -> the finetuning.config.json key that names the same resource
FINETUNING_KEYS = {"storageAccountName": "STORAGE_ACCOUNT_NAME", "fileShareName": "FILE_SHARE_NAME"}

Ask = Callable[[str, str | None], str]  # (question, default) -> answer


def option(help: str) -> Any:
    """A provider's own provision option: a field of its ProvisionRequest subclass, and the
    flag --NAME-WITH-DASHES of `tuneserve provision` (None when not given)."""
    return field(default=None, metadata={"help": help})


@dataclass(frozen=True)
class ProvisionOption:
    name: str  # the request field; the flag is --name-with-dashes
    type: Any  # its annotation, resolved (e.g. int | None)
    help: str


@dataclass
class ProvisionRequest:
    """What every provider provisions from; a provider's subclass adds its options."""

    subscription_id: str
    resource_group: str
    parameters: InferenceParameters
    finetuning: FinetuningConfig | None = None
    keys: EndpointKeys | None = None  # the endpoint's keys, kept by the platform as secrets
    # custom names from infra/provision/finetuning.parameters.json (infra.load_finetuning_names)
    finetuning_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def options(cls) -> list[ProvisionOption]:
        hints = typing.get_type_hints(cls)
        return [
            ProvisionOption(f.name, hints[f.name], f.metadata["help"])
            for f in dataclasses.fields(cls)
            if "help" in f.metadata
        ]

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

    def fill_models(self, endpoint: str, api_key: str | None) -> None:
        """The models and adapters the endpoint serves (/v1/models), else a note why not."""
        data = get_json(endpoint + "/v1/models", api_key=api_key)
        if not isinstance(data, dict):
            try:
                code = http_get(endpoint + "/v1/models", api_key=api_key)[0]
                self.notes.append(
                    f"/v1/models answered {code}" + (" (pass --api-key)" if code == 401 else "")
                )
            except OSError:
                self.notes.append("/v1/models did not answer")
            return
        cards = [c for c in data.get("data", []) if isinstance(c, dict)]
        self.models = [str(c.get("id")) for c in cards]
        self.adapters = [str(c.get("id")) for c in cards if c.get("parent")]


def pick(
    flag: str | None, fallback: str | None, *, question: str, option: str, ask: Ask | None
) -> str:
    """The flag's value, else the user's answer (on a terminal), else the fallback."""
    if flag:
        return flag
    if ask is not None:
        return ask(question, fallback)
    if fallback:
        return fallback
    raise DeployError(f"{question} is needed: pass {option} (no terminal to ask on)")


class Provider(ABC):
    """A platform the workspace deploys to. Subclasses set the class attributes and implement
    the abstract methods; deploy/registry.py lists them by `name`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # what it runs on, for --provider's help
    request_type: ClassVar[type[ProvisionRequest]] = ProvisionRequest
    default_timeout_s: ClassVar[float]  # deploy's wait for a new revision
    # whether replica_urls() are each replica (else the endpoint, reaching one of them)
    addresses_replicas: ClassVar[bool] = False
    # whether deploy --replicas sets how many replicas run (else the platform scales them)
    fixed_replicas: ClassVar[bool] = False
    # Where the subscription and resource group come from when no flag gives them:
    # "asked" (the platform has them: the user's answers, else the fine-tuning step's),
    # "finetuning" (they only seed derived names: the fine-tuning step's, so a null
    # storageAccountName is its account), "name" (the provider's name).
    scope_source: ClassVar[Literal["asked", "finetuning", "name"]] = "name"
    # rules for infra/inference.config.json's values beyond the shared ones
    config_rules: ClassVar[dict[str, naming.NameRule]] = {}

    def __init__(
        self, paths: InfraPaths, config: InferenceConfig | None, console: Console | None = None
    ) -> None:
        self.paths = paths
        self.config = config
        self.console = console or stderr_console()

    @classmethod
    def scope(
        cls,
        subscription: str | None,
        resource_group: str | None,
        finetuning: FinetuningConfig | None,
        ask: Ask | None,
    ) -> tuple[str, str]:
        """The subscription and resource group to provision into, which seed the derived
        names: the flags, else what `scope_source` says, else the provider's name."""
        if cls.scope_source != "asked":
            seeds = finetuning if cls.scope_source == "finetuning" else None
            return (
                subscription or getattr(seeds, "SUBSCRIPTION_ID", None) or cls.name,
                resource_group or getattr(seeds, "RESOURCE_GROUP_NAME", None) or cls.name,
            )
        asked = [
            (subscription, "SUBSCRIPTION_ID", "Subscription id", "--subscription"),
            (resource_group, "RESOURCE_GROUP_NAME", "Resource group", "--resource-group"),
        ]
        sub, rg = (
            pick(flag, getattr(finetuning, key, None), question=question, option=opt, ask=ask)
            for flag, key, question, opt in asked
        )
        return sub, rg

    def _config(self) -> InferenceConfig:
        if self.config is None:
            raise NotProvisionedError(f"run 'tuneserve provision --provider {self.name}' first")
        return self.config

    @property
    def endpoint(self) -> str:
        return self._config().endpoint_url

    @abstractmethod
    def provision(self, request: Any) -> InferenceConfig: ...

    def deploy(
        self,
        *,
        timeout: float | None = None,
        replicas: int | None = None,
        prune: bool = False,
        force: bool = False,
        include_model_cache: bool | None = None,
    ) -> DeployResult:
        """Sync the workspace to the share, then roll out a new revision (the previous one
        serves until the new one is ready, where the platform allows)."""
        with self.deploying(replicas):
            result = self.sync_workspace(
                self.share_target(),
                prune=prune,
                force=force,
                include_model_cache=include_model_cache,
            )
            timeout = self.default_timeout_s if timeout is None else timeout
            return self.roll_out(result.summary(), timeout=timeout, replicas=replicas)

    def deploying(self, replicas: int | None) -> contextlib.AbstractContextManager[None]:
        """Held for a whole deploy (a lock, where two deploys could collide); it checks the
        request before anything is synced."""
        return contextlib.nullcontext()

    @abstractmethod
    def roll_out(self, sync_summary: str, *, timeout: float, replicas: int | None) -> DeployResult:
        """Deploy after the sync: a new revision running what the share now holds."""

    @abstractmethod
    def status(self, *, api_key: str | None = None) -> StatusReport: ...

    @abstractmethod
    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]: ...

    @abstractmethod
    def stop(self) -> str: ...

    @abstractmethod
    def share_target(self) -> SyncTarget: ...

    def no_replica_note(self) -> str:
        """What `adapters push` says when replica_urls() is empty."""
        return (
            "no replica is serving: the share holds the adapter, and the next "
            "'tuneserve deploy' serves it"
        )

    @abstractmethod
    def replica_urls(self) -> list[str]:
        """The URLs to tell about an adapter change: each replica where the platform lets us
        address them, else the endpoint."""

    def sync_workspace(
        self,
        target: SyncTarget,
        *,
        prune: bool,
        force: bool,
        include_model_cache: bool | None,
    ) -> SyncResult:
        """Deploy's first step on every platform."""
        self.console.print(f"Syncing {self.paths.workspace} to the share {target.describe()}")
        with self.share_errors(target):
            result = sync_to_share(
                self.paths,
                target,
                prune=prune,
                force=force,
                include_model_cache=include_model_cache,
                console=self.console,
            )
        self.console.print(f"  {result.summary()}")
        return result

    def share_errors(self, target: SyncTarget) -> contextlib.AbstractContextManager[None]:
        """Turns the share's own errors into ones that say what to check."""
        return contextlib.nullcontext()

    def not_ready(
        self,
        revision: str,
        why: str,
        logs: list[tuple[str, list[str]]],
        previous: str | None,
        warnings: Sequence[str] = (),
    ) -> DeployFailedError:
        """The error of a deploy whose new revision did not become ready: why, the last lines
        of each log (title, lines), and whether the previous revision still serves."""
        lines = [f"deploy failed: revision {revision} did not become ready: {why}."]
        for title, tail in logs:
            lines.append(title)
            lines += [f"  | {line}" for line in tail] or ["  | (empty)"]
        lines += [f"Warning: {warning}" for warning in warnings]
        lines.append(
            f"The previous revision {previous} is still serving at {self.endpoint}."
            if previous
            else "No previous revision is serving."
        )
        return DeployFailedError("\n".join(lines), previous_revision=previous)


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
    """The workspace and the tuneserve build to the share (one place, so the container start
    rehearsal lays out the share exactly as deploy does). The rules (what is kept,
    model-cache/) are sync.sync's."""
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
