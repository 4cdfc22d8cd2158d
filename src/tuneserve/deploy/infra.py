"""The infra/ files of an AI Toolkit workspace, as pydantic models, with errors that point at the
file, line and field.

    infra/provision/inference.parameters.json   ARM deployment parameters (the template's nine)
    infra/provision/inference.bicep             the template (and inference.json, its ARM twin)
    infra/inference.config.json                 six keys written by provision, read by deploy
    infra/finetuning.config.json                from the fine-tuning step; read for defaults
    infra/provision/finetuning.parameters.json  the fine-tuning step's names; read for defaults
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneserve.deploy import naming
from tuneserve.errors import InfraFileError, NotProvisionedError
from tuneserve.jsonfile import JsonFileProblem, kind_of, read_json_object
from tuneserve.settings import DEFAULT_SHUTDOWN_TIMEOUT_S

PARAMETERS_SCHEMA = (
    "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#"
)
PARAMETER_NAMES: tuple[str, ...] = (
    "defaultCommands",
    "maximumInstanceCount",
    "location",
    "storageAccountName",
    "fileShareName",
    "acaEnvironmentName",
    "acaEnvironmentStorageName",
    "acaAppName",
    "acaLogAnalyticsName",
)
NAME_PARAMETERS: tuple[str, ...] = PARAMETER_NAMES[3:]
CONFIG_KEYS: tuple[str, ...] = (
    "SUBSCRIPTION_ID",
    "RESOURCE_GROUP_NAME",
    "STORAGE_ACCOUNT_NAME",
    "FILE_SHARE_NAME",
    "ACA_APP_NAME",
    "ACA_APP_ENDPOINT",
)
TARGET_PORT = 7860  # the container's ingress target port (the template's)
MOUNT = "/mount"  # where the share is mounted in the container
BUILD_DIR = ".tuneserve-build"  # the tuneserve source tree deploy writes to the share

# What the container runs (joined with "; ", run by /bin/bash -c). The build is installed unless
# the image already has a `tuneserve` (the local provider puts the running one on PATH).
DEFAULT_COMMANDS: list[str] = [
    f"cd {MOUNT}",
    'export TUNESERVE_REVISION="${TUNESERVE_REVISION:-$CONTAINER_APP_REVISION}"',
    "command -v tuneserve >/dev/null || "
    f"pip install --no-cache-dir --quiet --root-user-action=ignore {MOUNT}/{BUILD_DIR}",
    f"exec tuneserve serve --workspace {MOUNT} --host 0.0.0.0 --port {TARGET_PORT}",
]
# The most GPU instances (NC24-A100 nodes) by default: 2, so that a deploy has a node free for the
# new revision while the old one still serves (see gpu_plan).
DEFAULT_MAXIMUM_INSTANCE_COUNT = 2

# --- the container (Azure) ---------------------------------------------------------------------
# The image both templates run (inference.bicep and inference.json; tests/deploy/test_templates.py
# checks that they name exactly this image and that its torch and Python satisfy pyproject.toml's
# `torch>=` floor and `requires-python`, and the installed transformers' own floors).
# - torch >= 2.6: transformers 5 disables PyTorch below 2.6 (transformers/utils/import_utils.py,
#   is_torch_available: "Disabling PyTorch because PyTorch >= 2.6 is required") and declares
#   `torch>=2.6` for its torch extra; 2.6.0 is the oldest release that passes.
# - Python >= 3.11 (transformers 5's Requires-Python). The official images install Python with
#   conda at the Dockerfile's PYTHON_VERSION: 3.11 in pytorch/pytorch's Dockerfile
#   (`ARG PYTHON_VERSION=3.11`); for this very tag the Python is 3.11.11, as recorded by
#   rlan/notebooks build/Dockerfile.pytorch2.6.0-cuda12.4 ("PyTorch 2.6.0 / Python 3.11.11",
#   base digest sha256:2428b92ebbaeceba5572b98c18c8a94e43162bead6e88588ad54471147c58a20).
# - CUDA 12.4, the CUDA of the image the template ran before, so the NC24-A100 nodes' driver is
#   the one that image already needed.
CONTAINER_IMAGE = "docker.io/pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
CONTAINER_IMAGE_TORCH = "2.6.0"
CONTAINER_IMAGE_PYTHON = "3.11.11"

# How long a replica may drain running requests after SIGTERM: `tuneserve serve
# --shutdown-timeout`'s default.
SHUTDOWN_TIMEOUT_S = DEFAULT_SHUTDOWN_TIMEOUT_S
# How long the platform waits after SIGTERM before it kills: the drain, plus the seconds a
# replica takes to exit once drained (about one here: uvicorn's shutdown, the engine's stop).
# The templates' terminationGracePeriodSeconds and the local provider's stop (tests check).
TERMINATION_GRACE_S = SHUTDOWN_TIMEOUT_S + 10


@dataclass(frozen=True)
class GpuPlan:
    """How many GPU nodes the environment's GPU workload profile may hold and how many replicas
    the app may run. Each replica takes a whole NC24-A100 node (24 CPU / 220 Gi), and in single
    revision mode a new revision's replica must start beside the old one's before traffic moves:
    a deploy rolls without a gap only when a node is left over beyond the replicas."""

    nodes: int  # the GPU profile's maximumCount
    max_replicas: int  # the app's scale.maxReplicas

    @property
    def rolls(self) -> bool:
        """Whether a new revision can come up beside the old one (else: restart in place)."""
        return self.nodes > self.max_replicas


def gpu_plan(maximum_instance_count: int, profile_maximum_count: int | None = None) -> GpuPlan:
    """The templates' arithmetic (they compute the same; tests/deploy/test_templates.py checks):
    maximumInstanceCount is the most GPU instances (nodes); the app's replicas are capped at one
    fewer (at least 1) so a deploy always finds a free node; an environment shared with
    fine-tuning keeps a larger GPU profile (`profile_maximum_count`, the template's
    gpuProfileMaximumCount) rather than being lowered."""
    if maximum_instance_count < 1:
        raise ValueError(f"maximumInstanceCount must be at least 1 (got {maximum_instance_count})")
    nodes = max(maximum_instance_count, profile_maximum_count or 0)
    return GpuPlan(nodes=nodes, max_replicas=max(1, maximum_instance_count - 1))


# infra/inference.config.json without PROVIDER is the AI Toolkit's own file: Azure's
DEFAULT_PROVIDER = "azure"
T = TypeVar("T")


@dataclass(frozen=True)
class InfraPaths:
    """Where a workspace keeps its infra files and local state."""

    workspace: Path

    @property
    def infra(self) -> Path:
        return self.workspace / "infra"

    @property
    def provision_dir(self) -> Path:
        return self.infra / "provision"

    @property
    def parameters(self) -> Path:
        return self.provision_dir / "inference.parameters.json"

    @property
    def bicep(self) -> Path:
        return self.provision_dir / "inference.bicep"

    @property
    def arm_template(self) -> Path:
        return self.provision_dir / "inference.json"

    @property
    def config(self) -> Path:
        return self.infra / "inference.config.json"

    @property
    def finetuning_config(self) -> Path:
        return self.infra / "finetuning.config.json"

    @property
    def finetuning_parameters(self) -> Path:
        """The fine-tuning step's ARM parameters (read for its custom resource names)."""
        return self.provision_dir / "finetuning.parameters.json"

    @property
    def state(self) -> Path:
        """Local state: the local provider's share, replicas, logs; the sync hash cache."""
        return self.workspace / ".tuneserve"

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.workspace))
        except ValueError:
            return str(path)


# --- inference.parameters.json ---------------------------------------------------------------


class Param(BaseModel, Generic[T]):
    """One ARM parameter entry: {"value": ...} (Key Vault references are not supported)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    value: T


class ParameterValues(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    defaultCommands: Param[list[str]] = Field(
        default_factory=lambda: Param[list[str]](value=list(DEFAULT_COMMANDS))
    )
    maximumInstanceCount: Param[int] = Field(
        default_factory=lambda: Param[int](value=DEFAULT_MAXIMUM_INSTANCE_COUNT)
    )
    location: Param[str | None] = Field(default_factory=lambda: Param[str | None](value=None))
    storageAccountName: Param[str | None] = Field(
        default_factory=lambda: Param[str | None](value=None)
    )
    fileShareName: Param[str | None] = Field(default_factory=lambda: Param[str | None](value=None))
    acaEnvironmentName: Param[str | None] = Field(
        default_factory=lambda: Param[str | None](value=None)
    )
    acaEnvironmentStorageName: Param[str | None] = Field(
        default_factory=lambda: Param[str | None](value=None)
    )
    acaAppName: Param[str | None] = Field(default_factory=lambda: Param[str | None](value=None))
    acaLogAnalyticsName: Param[str | None] = Field(
        default_factory=lambda: Param[str | None](value=None)
    )

    @field_validator("defaultCommands")
    @classmethod
    def _commands(cls, p: Param[list[str]]) -> Param[list[str]]:
        if not p.value or not any(c.strip() for c in p.value):
            raise ValueError("must list at least one command (they start the web API)")
        return p

    @field_validator("maximumInstanceCount")
    @classmethod
    def _count(cls, p: Param[int]) -> Param[int]:
        if p.value < 1:
            raise ValueError(f"must be at least 1 (got {p.value})")
        return p

    @field_validator("location")
    @classmethod
    def _location(cls, p: Param[str | None]) -> Param[str | None]:
        if p.value is not None and not p.value.strip():
            raise ValueError("must be a region such as 'westus3', or null for the group's")
        return p

    @field_validator(*NAME_PARAMETERS)
    @classmethod
    def _names(cls, p: Param[str | None], info: Any) -> Param[str | None]:
        if p.value is not None:
            problem = naming.RULES_BY_PARAMETER[info.field_name].check(p.value)
            if problem:
                raise ValueError(problem)
        return p


class InferenceParameters(BaseModel):
    """infra/provision/inference.parameters.json."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    schema_: str = Field(PARAMETERS_SCHEMA, alias="$schema")
    contentVersion: str = "1.0.0.0"
    parameters: ParameterValues

    def values(self) -> dict[str, Any]:
        return {name: getattr(self.parameters, name).value for name in PARAMETER_NAMES}

    def names(self) -> dict[str, str | None]:
        return {name: getattr(self.parameters, name).value for name in NAME_PARAMETERS}

    @classmethod
    def default(cls) -> InferenceParameters:
        return cls.model_validate({"parameters": {}})

    def to_json(self) -> str:
        data = {
            "$schema": self.schema_,
            "contentVersion": self.contentVersion,
            "parameters": {name: {"value": value} for name, value in self.values().items()},
        }
        return json.dumps(data, indent=2) + "\n"


# --- inference.config.json -------------------------------------------------------------------


class InferenceConfig(BaseModel):
    """infra/inference.config.json: the six keys (null until provisioned), plus our PROVIDER."""

    model_config = ConfigDict(extra="forbid", strict=True)

    SUBSCRIPTION_ID: str | None
    RESOURCE_GROUP_NAME: str | None
    STORAGE_ACCOUNT_NAME: str | None
    FILE_SHARE_NAME: str | None
    ACA_APP_NAME: str | None
    ACA_APP_ENDPOINT: str | None
    PROVIDER: str | None = Field(
        None,
        description="tuneserve's addition: a provider of deploy/registry.py (absent means "
        f"{DEFAULT_PROVIDER}).",
    )

    @field_validator("PROVIDER")
    @classmethod
    def _known_provider(cls, value: str | None) -> str | None:
        # imported here: the providers themselves import this module
        from tuneserve.deploy.registry import names

        if value is not None and value not in names():
            accepted = " or ".join(repr(n) for n in names())
            raise ValueError(f"Input should be {accepted} (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check_values(self) -> InferenceConfig:
        from tuneserve.deploy.registry import PROVIDERS

        problems = []
        rules = {"ACA_APP_NAME": naming.CONTAINER_APP, "FILE_SHARE_NAME": naming.FILE_SHARE}
        rules.update(PROVIDERS[self.provider].config_rules)
        for key in CONFIG_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if not value.strip():
                problems.append(f"{key} is empty; give a value or null")
            elif value.lstrip().startswith("<") and value.rstrip().endswith(">"):
                problems.append(f"{key} is still the placeholder {value!r}; fill it in")
            elif key in rules and (problem := rules[key].check(value)):
                problems.append(f"{key}: {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def provider(self) -> str:
        return self.PROVIDER or DEFAULT_PROVIDER

    @classmethod
    def empty(cls) -> InferenceConfig:
        return cls(**{key: None for key in CONFIG_KEYS})

    def missing(self) -> list[str]:
        return [key for key in CONFIG_KEYS if getattr(self, key) is None]

    @property
    def endpoint_url(self) -> str:
        """ACA_APP_ENDPOINT as a URL (the template's output is a bare FQDN: https is implied)."""
        value = (self.ACA_APP_ENDPOINT or "").strip().rstrip("/")
        return value if "://" in value else f"https://{value}"

    def to_json(self) -> str:
        data: dict[str, Any] = {key: getattr(self, key) for key in CONFIG_KEYS}
        if self.PROVIDER is not None:
            data["PROVIDER"] = self.PROVIDER
        return json.dumps(data, indent=2) + "\n"


class FinetuningConfig(BaseModel):
    """infra/finetuning.config.json from the fine-tuning step (another tool's file: lenient)."""

    model_config = ConfigDict(extra="allow")

    SUBSCRIPTION_ID: str | None = None
    RESOURCE_GROUP_NAME: str | None = None
    STORAGE_ACCOUNT_NAME: str | None = None
    FILE_SHARE_NAME: str | None = None
    ACA_JOB_NAME: str | None = None
    COMMANDS: list[str] | None = None


# --- reading and writing ---------------------------------------------------------------------


def read_json(path: Path, *, shown: str | None = None) -> dict[str, Any]:
    """Parse a JSON object, or raise InfraFileError naming the file, line and column."""
    return _read_json(path, shown=shown)[0]


def _read_json(path: Path, *, shown: str | None = None) -> tuple[dict[str, Any], str]:
    try:
        return read_json_object(path)
    except JsonFileProblem as exc:
        raise InfraFileError(shown or str(path), str(exc)) from None


def _line_of(text: str, loc: list[str]) -> str:
    """'line N: ' of the deepest key of `loc` found in the file's text, else ''."""
    pos = 0
    found = None
    for key in loc:
        if key == "value":
            continue
        at = text.find(json.dumps(key), pos)
        if at < 0:
            break
        pos = found = at
    return "" if found is None else f"line {text.count(chr(10), 0, found) + 1}: "


def _format_errors(
    exc: ValidationError, *, known: tuple[str, ...], what: str, text: str = ""
) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        # pydantic reports a failed field validator on Param as the field; drop generic noise
        loc = [p for p in loc if not p.startswith("function-")]
        field = _line_of(text, loc) + (".".join(loc) or "(top level)")
        kind = err["type"]
        if kind == "extra_forbidden":
            name = loc[-1] if loc else "?"
            if len(loc) >= 2 and loc[0] == "parameters" and len(loc) == 2:
                msg = f"unknown parameter {name!r}; the template's parameters are: " + ", ".join(
                    known
                )
            elif len(loc) == 1 and what == "config":
                msg = f"unknown key {name!r}; the keys are: " + ", ".join(known) + " (+ PROVIDER)"
            else:
                msg = f"unknown key {name!r}"
            lines.append(f"{_line_of(text, loc)}{'.'.join(loc[:-1]) or '(top level)'}: {msg}")
            continue
        if kind == "missing":
            lines.append(f"{field}: missing key")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if kind.endswith("_type") or kind in {"literal_error"}:
            msg += f" (got {kind_of(err.get('input'))}: {json.dumps(err.get('input'))[:60]})"
        lines.append(msg if not loc else f"{field}: {msg}")
    return "; ".join(dict.fromkeys(lines))


def load_parameters(path: Path, *, shown: str | None = None) -> InferenceParameters:
    data, text = _read_json(path, shown=shown)
    if "parameters" not in data:
        raise InfraFileError(shown or path, "missing key 'parameters' (the ARM parameters object)")
    try:
        return InferenceParameters.model_validate(data)
    except ValidationError as exc:
        raise InfraFileError(
            shown or path, _format_errors(exc, known=PARAMETER_NAMES, what="parameters", text=text)
        ) from None


def load_config(path: Path, *, shown: str | None = None) -> InferenceConfig:
    if not path.exists():
        raise NotProvisionedError(
            f"{shown or path} not found. Run 'tuneserve provision' first, or 'tuneserve init' "
            "and fill it in by hand for resources you created yourself."
        )
    data, text = _read_json(path, shown=shown)
    try:
        return InferenceConfig.model_validate(data)
    except ValidationError as exc:
        raise InfraFileError(
            shown or path, _format_errors(exc, known=CONFIG_KEYS, what="config", text=text)
        ) from None


def load_complete_config(path: Path, *, shown: str | None = None) -> InferenceConfig:
    """The config with all six keys set, else NotProvisionedError naming the null ones."""
    config = load_config(path, shown=shown)
    if missing := config.missing():
        raise NotProvisionedError(
            f"{shown or path}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} null. "
            "Run 'tuneserve provision', or fill in the values of resources you created yourself."
        )
    return config


def load_finetuning_config(path: Path) -> FinetuningConfig | None:
    if not path.exists():
        return None
    data = read_json(path)
    try:
        return FinetuningConfig.model_validate(data)
    except ValidationError as exc:
        raise InfraFileError(path, _format_errors(exc, known=(), what="finetuning")) from None


# the fine-tuning step's parameters that name resources inference can share (its acaJobName
# names a job, not something inference reuses)
FINETUNING_NAME_PARAMETERS: tuple[str, ...] = (
    "storageAccountName",
    "fileShareName",
    "acaEnvironmentName",
    "acaEnvironmentStorageName",
    "acaLogAnalyticsName",
)


def load_finetuning_names(path: Path, *, shown: str | None = None) -> dict[str, str]:
    """The custom names in infra/provision/finetuning.parameters.json (the fine-tuning step's ARM
    parameters file, the same shape as ours): {parameter: name} for those that are not null; {}
    when the file is absent. Another tool's file: other parameters are ignored, but a name that
    is there must be a string (or null) that Azure accepts."""
    if not path.exists():
        return {}
    data, text = _read_json(path, shown=shown)
    where = shown or str(path)
    params = data.get("parameters")
    if not isinstance(params, dict):
        raise InfraFileError(
            where,
            "'parameters' must be an object of parameter entries like "
            f'{{"value": ...}}, found {kind_of(params)}',
        )
    names: dict[str, str] = {}
    for name in FINETUNING_NAME_PARAMETERS:
        entry = params.get(name)
        if entry is None:
            continue
        value = entry.get("value") if isinstance(entry, dict) else entry
        line = _line_of(text, ["parameters", name])
        if value is None:
            continue
        if not isinstance(value, str):
            raise InfraFileError(
                where,
                f"{line}parameters.{name}.value: expected a name (a string) or null, found "
                f"{kind_of(value)}: {json.dumps(value)[:60]}",
            )
        if problem := naming.RULES_BY_PARAMETER[name].check(value):
            raise InfraFileError(where, f"{line}parameters.{name}.value: {problem}")
        names[name] = value
    return names
