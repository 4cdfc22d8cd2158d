"""The Azure Container Apps provider (optional extra: `pip install 'tuneserve[azure]'`).

provision  the ARM twin of infra/provision/inference.bicep (infra/provision/inference.json, else
           the packaged one) as an incremental resource-group deployment named
           "tuneserve-inference" (re-running updates it: idempotent); its outputs are the six
           config keys, written as the template outputs them. The endpoint's keys go as the
           `@secure()` parameters apiKey/adminKey (Container Apps secrets, never in a file on the
           share). Null names are left to the template, or taken from the fine-tuning step when
           provisioning into its subscription and resource group. An existing environment's GPU
           profile is never lowered (gpuProfileMaximumCount).
deploy     sync the workspace and the tuneserve build to the Azure Files share (only changed
           files), then, when the GPU profile has a node to spare beyond the app's replicas,
           PATCH the app with a new `template.revisionSuffix`: in single revision mode Container
           Apps keeps the previous revision serving until the new one is ready (startup/readiness
           probes on /ready), so the switch has no gap. We wait until the revision is Running and
           Healthy and the endpoint's /health reports it; on failure or timeout the new revision
           is deactivated and the previous one goes on serving. With no node to spare
           (maximumInstanceCount 1) a new revision could never start, so deploy restarts the
           active revision in place (the AI Toolkit template's behaviour) and says that the
           endpoint is down until the restarted replica is ready.
logs       the app's log stream (the endpoint `az containerapp logs show` uses), every replica.

Credentials: azure-identity's DefaultAzureCredential (az login, environment, managed identity).
Azure Files data access uses the same credential (token_intent="backup": the identity needs
"Storage File Data Privileged Contributor"), or the account key in AZURE_STORAGE_KEY.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import string
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneserve.deploy import naming
from tuneserve.deploy.base import (
    DeployResult,
    Provider,
    ProvisionRequest,
    StatusReport,
    option,
)
from tuneserve.deploy.http import get_json, http_get, is_ready, open_lines
from tuneserve.deploy.infra import (
    CONFIG_KEYS,
    GpuPlan,
    InferenceConfig,
    InfraPaths,
    gpu_plan,
)
from tuneserve.deploy.keys import keys_path, resolve_key
from tuneserve.deploy.shares import (
    Advance,
    FolderFiles,
    RemoteFile,
    SyncTarget,
    install_by_renames,
    remove_by_rename,
)
from tuneserve.deploy.waiting import wait_until
from tuneserve.errors import DeployFailedError, ProviderError

try:
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceNotFoundError,
    )
except ImportError:  # the azure extra is not installed: no SDK call can raise these

    class AzureError(Exception):  # type: ignore[no-redef]
        pass

    class HttpResponseError(AzureError):  # type: ignore[no-redef]
        pass

    class ClientAuthenticationError(HttpResponseError):  # type: ignore[no-redef]
        pass

    class ResourceExistsError(HttpResponseError):  # type: ignore[no-redef]
        pass

    class ResourceNotFoundError(HttpResponseError):  # type: ignore[no-redef]
        pass


DEPLOYMENT_NAME = "tuneserve-inference"
POLL_S = 10.0
GPU_PROFILE = "GPU"  # the templates' GPU workload profile (and the fine-tuning template's)
CONTAINERAPP_DEFAULT_MAX_REPLICAS = 10  # Container Apps' scale.maxReplicas when none is set
_SUFFIX_CHARS = string.ascii_lowercase + string.digits


def _sdk_error(exc: ImportError) -> ProviderError:
    return ProviderError(
        f"the Azure provider needs the azure extra (missing: {exc.name}): "
        "pip install 'tuneserve[azure]'"
    )


def _reason(exc: AzureError) -> str:
    """An Azure error in one line: HTTP status, error code, message."""
    status = getattr(exc, "status_code", None)
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None) or getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    message = getattr(error, "message", None) or getattr(exc, "message", None) or str(exc)
    message = str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__
    parts = [f"HTTP {status}" if status else "", str(code) if code else ""]
    head = " ".join(p for p in parts if p)
    return f"{head}: {message}" if head else message


@contextlib.contextmanager
def azure_errors(what: str, *, not_found: str = "") -> Iterator[None]:
    """Turn the SDKs' errors (azure.core.exceptions) into a ProviderError saying what failed and
    what to do. `not_found` is the advice for a 404."""
    try:
        yield
    except ClientAuthenticationError as exc:
        raise ProviderError(
            f"{what}: Azure did not accept the credentials ({_reason(exc)}). Sign in with "
            "'az login' (or set AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET for a "
            "service principal) with a role on the subscription"
        ) from None
    except ResourceNotFoundError as exc:
        raise ProviderError(
            f"{what}: not found ({_reason(exc)})" + (f". {not_found}" if not_found else "")
        ) from None
    except HttpResponseError as exc:
        raise ProviderError(f"{what}: {_reason(exc)}") from None
    except AzureError as exc:  # ServiceRequestError and the like: Azure was not reached
        raise ProviderError(f"{what}: could not reach Azure ({exc})") from None


def _wire(model: Any) -> dict[str, Any]:
    """An SDK model as its REST JSON (camelCase), whatever the SDK generation."""
    if model is None:
        return {}
    if isinstance(model, MutableMapping) and hasattr(model, "as_dict"):
        return dict(model.as_dict())
    if hasattr(model, "serialize"):
        return dict(model.serialize(keep_readonly=True))
    return dict(model)


def _stamp(value: Any) -> str:
    """A share timestamp (datetime, or ISO text with 7-digit fractions) as comparable text."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    text = str(value or "")
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", text)
    if not m:
        return text
    fraction = f".{(m.group(2) or '')[:6].ljust(6, '0')}" if m.group(2) else ""
    try:
        parsed = datetime.fromisoformat(
            m.group(1) + fraction + (m.group(3) or "+00:00").replace("Z", "+00:00")
        )
    except ValueError:
        return text
    return parsed.astimezone(UTC).isoformat()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def revision_suffix(now: datetime | None = None) -> str:
    """A new revision's suffix: 'd' + the UTC time to the second + 4 random characters, so two
    deploys in the same second (two terminals, a CI retry) still get different revisions.
    17 characters: with a container app name of at most 32 the revision name stays short."""
    stamp = (now or _utcnow()).strftime("%y%m%d%H%M%S")
    return "d" + stamp + "".join(secrets.choice(_SUFFIX_CHARS) for _ in range(4))


def _outputs(result: dict[str, Any]) -> dict[str, Any]:
    """The deployment's outputs by lowercased name: ARM does not keep the case of output names
    (azd works around the same: Azure/azure-dev#512, 'pOSTGRES_USER')."""
    outputs = result.get("properties", {}).get("outputs") or {}
    return {str(k).lower(): v for k, v in outputs.items()}


_ENV_ID = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/([^/]+)/providers/Microsoft\.App/"
    r"managedEnvironments/([^/]+)$",
    re.IGNORECASE,
)


def packaged_template() -> dict[str, Any]:
    text = resources.files("tuneserve.templates").joinpath("inference.json").read_text("utf-8")
    return dict(json.loads(text))


class AzureFileShareTarget:
    """An Azure Files share as a sync target (azure-storage-file-share)."""

    def __init__(self, share: Any) -> None:
        self.share = share
        self._dirs: set[str] = {""}

    def describe(self) -> str:
        return f"{self.share.account_name}/{self.share.share_name}"

    def list_files(self, under: str = "") -> dict[str, RemoteFile]:
        """Every file (or those below the folder `under`), by path relative to the share."""
        out: dict[str, RemoteFile] = {}
        pending = [under.strip("/")]
        while pending:
            path = pending.pop()
            client = self.share.get_directory_client(path)
            try:
                items = list(client.list_directories_and_files(include=["timestamps"]))
            except ResourceNotFoundError:  # a fresh share, or a folder not made yet
                continue
            for item in items:
                rel = f"{path}/{item['name']}" if path else item["name"]
                if item.get("is_directory"):
                    self._dirs.add(rel)
                    pending.append(rel)
                else:
                    stamp = _stamp(item.get("last_modified") or item.get("last_write_time"))
                    out[rel] = RemoteFile(int(item.get("size") or 0), stamp)
        return out

    def read_text(self, rel: str) -> str | None:
        try:
            data: bytes = self.share.get_file_client(rel).download_file().readall()
        except ResourceNotFoundError:
            return None
        return data.decode("utf-8")

    def _ensure_dir(self, rel_dir: str) -> None:
        parts = [p for p in rel_dir.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self._dirs:
                continue
            with contextlib.suppress(ResourceExistsError):
                self.share.get_directory_client(sub).create_directory()
            self._dirs.add(sub)

    def upload(self, src: Path, rel: str, advance: Any) -> RemoteFile:
        self._ensure_dir(rel.rpartition("/")[0])
        client = self.share.get_file_client(rel)
        size = src.stat().st_size
        done = [0]

        def hook(current: int, _total: int | None) -> None:
            advance(current - done[0])
            done[0] = current

        with src.open("rb") as fh:
            client.upload_file(fh, length=size, max_concurrency=2, progress_hook=hook)
        props = client.get_file_properties()
        return RemoteFile(size, _stamp(props.get("last_modified") or props.get("last_write_time")))

    def write_text(self, rel: str, text: str) -> None:
        self._ensure_dir(rel.rpartition("/")[0])
        self.share.get_file_client(rel).upload_file(text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self.share.get_file_client(rel).delete_file()

    def rename_dir(self, rel: str, new_rel: str) -> None:
        """Move a directory and what it holds in one call (Rename Directory; new_rel must not
        exist). Azure refuses while an SMB client holds a file in it open."""
        self.share.get_directory_client(rel.strip("/")).rename_directory(new_rel.strip("/"))
        moved = rel.strip("/")
        self._dirs = {d for d in self._dirs if d != moved and not d.startswith(moved + "/")}

    def delete_empty_dirs(self, rel: str) -> None:
        """Remove the folder `rel` and its subfolders where they hold no file (Azure Files
        deletes only empty directories, so the deepest go first)."""
        top = rel.strip("/")
        found, pending = [top], [top]
        while pending:
            path = pending.pop()
            try:
                items = list(self.share.get_directory_client(path).list_directories_and_files())
            except ResourceNotFoundError:
                continue
            for item in items:
                if item.get("is_directory"):
                    sub = f"{path}/{item['name']}"
                    found.append(sub)
                    pending.append(sub)
        for path in sorted(found, key=lambda p: p.count("/"), reverse=True):
            try:
                self.share.get_directory_client(path).delete_directory()
            except ResourceNotFoundError:
                pass
            except HttpResponseError as exc:
                code = getattr(exc, "error_code", None)
                if getattr(code, "value", code) != "DirectoryNotEmpty":
                    raise
            self._dirs.discard(path)

    def install_dir(self, rel: str, files: FolderFiles, advance: Advance) -> bool:
        return install_by_renames(self, rel, files, advance)

    def remove_dir(self, rel: str) -> None:
        remove_by_rename(self, rel)


@dataclass
class AzureProvisionRequest(ProvisionRequest):
    location: str | None = option("the region for a resource group that does not exist yet.")


class AzureProvider(Provider):
    name = "azure"
    summary = "Azure Container Apps"
    scope_source = "asked"
    request_type = AzureProvisionRequest
    default_timeout_s = 1800.0
    # STORAGE_ACCOUNT_NAME names an Azure storage account (the local provider's is a folder)
    config_rules = {"STORAGE_ACCOUNT_NAME": naming.STORAGE_ACCOUNT}

    def __init__(
        self,
        paths: InfraPaths,
        config: InferenceConfig | None,
        console: Console | None = None,
        *,
        credential: Any = None,
        arm_endpoint: str | None = None,
        storage_url: str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        """`arm_endpoint`, `storage_url` and `client_kwargs` exist for tests against a stand-in."""
        super().__init__(paths, config, console)
        self._credential = credential
        self.arm_endpoint = arm_endpoint
        self.storage_url = storage_url
        self.client_kwargs = client_kwargs or {}
        self.poll_s = poll_s

    # -- clients --

    def credential(self) -> Any:
        if self._credential is None:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError as exc:
                raise _sdk_error(exc) from None
            self._credential = DefaultAzureCredential()
        return self._credential

    def _kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.client_kwargs)
        if self.arm_endpoint:
            kwargs["base_url"] = self.arm_endpoint
        return kwargs

    def _resource_client(self, subscription: str) -> Any:
        try:
            from azure.mgmt.resource.resources import ResourceManagementClient
        except ImportError:
            try:
                from azure.mgmt.resource import (  # type: ignore[attr-defined,no-redef]
                    ResourceManagementClient,  # older SDKs
                )
            except ImportError as exc:
                raise _sdk_error(exc) from None
        return ResourceManagementClient(self.credential(), subscription, **self._kwargs())

    def _deployments(self, subscription: str) -> Any:
        try:
            from azure.mgmt.resource.deployments import DeploymentsMgmtClient
        except ImportError:
            return self._resource_client(subscription).deployments  # SDKs before the split
        return DeploymentsMgmtClient(self.credential(), subscription, **self._kwargs()).deployments

    def _apps(self, subscription: str | None = None) -> Any:
        if subscription is None:
            subscription = str(self._config().SUBSCRIPTION_ID)
        try:
            from azure.mgmt.appcontainers import ContainerAppsAPIClient
        except ImportError as exc:
            raise _sdk_error(exc) from None
        return ContainerAppsAPIClient(self.credential(), subscription, **self._kwargs())

    def _share(self) -> Any:
        config = self._config()
        try:
            from azure.core.credentials import AzureNamedKeyCredential
            from azure.storage.fileshare import ShareClient
        except ImportError as exc:
            raise _sdk_error(exc) from None
        account = str(config.STORAGE_ACCOUNT_NAME)
        url = self.storage_url or f"https://{account}.file.core.windows.net"
        key = os.environ.get("AZURE_STORAGE_KEY")
        if key:
            return ShareClient(
                url, str(config.FILE_SHARE_NAME), credential=AzureNamedKeyCredential(account, key)
            )
        return ShareClient(
            url, str(config.FILE_SHARE_NAME), credential=self.credential(), token_intent="backup"
        )

    def _app_names(self) -> tuple[str, str]:
        config = self._config()
        return str(config.RESOURCE_GROUP_NAME), str(config.ACA_APP_NAME)

    def _get_app(self, apps: Any, rg: str, name: str) -> dict[str, Any]:
        config = self._config()
        with azure_errors(
            f"reading container app {name!r} in resource group {rg!r}",
            not_found=(
                f"Run 'tuneserve provision', or correct ACA_APP_NAME / RESOURCE_GROUP_NAME / "
                f"SUBSCRIPTION_ID ({config.SUBSCRIPTION_ID}) in "
                f"{self.paths.rel(self.paths.config)}"
            ),
        ):
            return _wire(apps.container_apps.get(rg, name))

    # -- provision --

    def template(self) -> dict[str, Any]:
        mine = self.paths.arm_template
        if mine.exists():
            template = dict(json.loads(mine.read_text(encoding="utf-8")))
            if self.paths.bicep.exists() and template == packaged_template():
                shipped = resources.files("tuneserve.templates").joinpath("inference.bicep")
                if self.paths.bicep.read_text(encoding="utf-8") != shipped.read_text("utf-8"):
                    self.console.print(
                        "[yellow]warning:[/] infra/provision/inference.bicep was edited but "
                        "inference.json was not; provision deploys inference.json: run "
                        "'az bicep build --file infra/provision/inference.bicep' to compile it"
                    )
            return template
        return packaged_template()

    def deployment_parameters(
        self, request: ProvisionRequest, *, gpu_profile_maximum_count: int | None = None
    ) -> dict[str, Any]:
        """The deployment's parameters: inference.parameters.json's (null names left to the
        template), the fine-tuning step's names where they apply, the endpoint's keys (secure
        parameters: never written to a file), and a larger GPU profile to keep."""
        if request.keys is None:
            raise ProviderError(
                "the template's apiKey and adminKey parameters need the endpoint's keys: run "
                "'tuneserve provision', which makes them (or pass --api-key/--admin-key)"
            )
        values = request.parameters.values()
        params: dict[str, Any] = {
            "defaultCommands": {"value": values["defaultCommands"]},
            "maximumInstanceCount": {"value": values["maximumInstanceCount"]},
        }
        if values["location"] is not None:
            params["location"] = {"value": values["location"]}
        for name, value in request.explicit_names(require_same_scope=True).items():
            params[name] = {"value": value}
        if gpu_profile_maximum_count is not None:
            params["gpuProfileMaximumCount"] = {"value": gpu_profile_maximum_count}
        params["apiKey"] = {"value": request.keys.api_key}
        params["adminKey"] = {"value": request.keys.admin_key}
        return params

    def _check_declares(self, template: dict[str, Any], params: dict[str, Any]) -> None:
        """A workspace's inference.json from an older tuneserve lacks the parameters we pass
        (the keys, a shared GPU profile to keep): say which and how to update, rather than
        deploy an open endpoint or lower a shared profile (ARM would refuse them anyway)."""
        missing = sorted(set(params) - set(template.get("parameters") or {}))
        if not missing:
            return
        mine = self.paths.arm_template
        where = self.paths.rel(mine) if mine.exists() else "the packaged inference.json"
        shipped = resources.files("tuneserve.templates").joinpath("inference.json")
        raise ProviderError(
            f"{where} does not declare the parameter(s) {', '.join(missing)} that provision "
            "passes (apiKey/adminKey: the endpoint's keys as Container Apps secrets; "
            "gpuProfileMaximumCount: keeps a shared environment's GPU profile). It is older than "
            f"this tuneserve: add them as in {shipped}, or delete infra/provision/inference.json "
            "and inference.bicep to deploy the packaged template ('tuneserve init --force' "
            "rewrites every infra/ file)"
        )

    def _note_finetuning_scope(self, request: ProvisionRequest) -> None:
        theirs = request.finetuning_defaults()
        if not theirs or request.finetuning_in_scope():
            return
        ft = request.finetuning
        where = (
            f"they are in subscription {ft.SUBSCRIPTION_ID}, resource group "
            f"{ft.RESOURCE_GROUP_NAME}"
            if ft is not None
            else "infra/finetuning.config.json, which says where they are, is missing"
        )
        self.console.print(
            f"note: not reusing the fine-tuning step's resources ({', '.join(sorted(theirs))}): "
            f"{where}, and this provisions into subscription "
            f"{request.subscription_id}, resource group {request.resource_group} (storage "
            "account names are global). Null names get the template's defaults; name them in "
            "infra/provision/inference.parameters.json to choose."
        )

    def _existing_gpu_profile(self, subscription: str, rg: str, environment: str) -> int | None:
        """The maximumCount of the GPU profile of an existing environment, else None."""
        apps = self._apps(subscription)
        with azure_errors(f"reading Container Apps environment {environment!r}"):
            try:
                env = _wire(apps.managed_environments.get(rg, environment))
            except ResourceNotFoundError:  # not created yet
                return None
        for profile in env.get("properties", {}).get("workloadProfiles") or []:
            if profile.get("name") == GPU_PROFILE and profile.get("maximumCount") is not None:
                return int(profile["maximumCount"])
        return None

    def provision(self, request: AzureProvisionRequest) -> InferenceConfig:
        sub, rg = request.subscription_id, request.resource_group
        with azure_errors(f"checking resource group {rg!r} in subscription {sub}"):
            groups = self._resource_client(sub).resource_groups
            exists = groups.check_existence(rg)
        if not exists:
            location = request.location or request.parameters.values()["location"]
            if not location:
                raise ProviderError(
                    f"resource group {rg!r} does not exist in subscription {sub}; pass "
                    "--location REGION to create it, or pick an existing one"
                )
            self.console.print(f"Creating resource group {rg} in {location}")
            with azure_errors(f"creating resource group {rg!r} in {location}"):
                groups.create_or_update(rg, {"location": location})
        self._note_finetuning_scope(request)

        count = int(request.parameters.values()["maximumInstanceCount"])
        environment = request.resolved_names(require_same_scope=True)["acaEnvironmentName"]
        existing = self._existing_gpu_profile(sub, rg, environment) if exists else None
        keep = existing if existing is not None and existing > count else None
        if keep is not None:
            self.console.print(
                f"The Container Apps environment {environment} (shared, e.g. with fine-tuning) "
                f"keeps its GPU profile's maximumCount of {existing} nodes: maximumInstanceCount "
                f"is {count}, and provisioning never lowers a shared profile. This app runs at "
                f"most {gpu_plan(count, keep).max_replicas} replica(s)."
            )
        elif existing is not None and existing < count:
            self.console.print(
                f"The GPU profile of environment {environment} grows from {existing} to {count} "
                "nodes (maximumInstanceCount)."
            )
        template = self.template()
        params = self.deployment_parameters(request, gpu_profile_maximum_count=keep)
        self._check_declares(template, params)
        body = {"properties": {"mode": "Incremental", "template": template, "parameters": params}}
        self.console.print(
            f"Deploying {DEPLOYMENT_NAME} to resource group {rg} (several minutes the first time)"
        )
        with (
            azure_errors(f"provisioning (deployment {DEPLOYMENT_NAME} in resource group {rg})"),
            self.console.status("Provisioning..."),
        ):
            poller = self._deployments(sub).begin_create_or_update(rg, DEPLOYMENT_NAME, body)
            result = _wire(poller.result())
        outputs = _outputs(result)
        missing = [key for key in CONFIG_KEYS if key.lower() not in outputs]
        if missing:
            raise ProviderError(
                f"the deployment {DEPLOYMENT_NAME} did not output {', '.join(missing)} (the "
                "template's outputs must be the six keys of infra/inference.config.json)"
            )
        # as the template writes them (ACA_APP_ENDPOINT: the ingress FQDN, no scheme)
        values = {key: str(outputs[key.lower()]["value"]) for key in CONFIG_KEYS}
        self.config = InferenceConfig(**values, PROVIDER=self.name)
        return self.config

    # -- deploy --

    def share_errors(self, target: SyncTarget) -> contextlib.AbstractContextManager[None]:
        return azure_errors(
            f"syncing to the file share {target.describe()}",
            not_found="Check STORAGE_ACCOUNT_NAME and FILE_SHARE_NAME in "
            f"{self.paths.rel(self.paths.config)}",
        )

    def live_plan(self, apps: Any, app: dict[str, Any]) -> GpuPlan | None:
        """The app's nodes and replicas as Azure has them: its scale.maxReplicas and the GPU
        profile's maximumCount in its environment. None when the app is not on a dedicated
        workload profile (then nodes are not what limits a new revision)."""
        props = app.get("properties", {})
        profile_name = props.get("workloadProfileName")
        env_id = str(props.get("environmentId") or props.get("managedEnvironmentId") or "")
        m = _ENV_ID.search(env_id)
        if not profile_name or not m:
            return None
        with azure_errors(f"reading Container Apps environment {m.group(2)!r}"):
            env = _wire(apps.managed_environments.get(m.group(1), m.group(2)))
        profile = next(
            (
                p
                for p in env.get("properties", {}).get("workloadProfiles") or []
                if p.get("name") == profile_name
            ),
            None,
        )
        if profile is None or profile.get("workloadProfileType") == "Consumption":
            return None
        scale = (props.get("template") or {}).get("scale") or {}
        replicas = int(scale.get("maxReplicas") or CONTAINERAPP_DEFAULT_MAX_REPLICAS)
        return GpuPlan(nodes=int(profile.get("maximumCount") or 0), max_replicas=replicas)

    def deploying(self, replicas: int | None) -> contextlib.AbstractContextManager[None]:
        if replicas is not None:
            self.console.print(
                "note: --replicas applies to the local provider; Azure scales between 1 and "
                "max(1, maximumInstanceCount - 1) replicas by HTTP concurrency"
            )
        return super().deploying(replicas)

    def roll_out(self, summary: str, *, timeout: float, replicas: int | None) -> DeployResult:
        config = self._config()
        rg, name = self._app_names()
        apps = self._apps()
        app = self._get_app(apps, rg, name)
        props = app.get("properties", {})
        previous = props.get("latestReadyRevisionName")
        if props.get("runningStatus") == "Stopped":
            with azure_errors(f"starting container app {name!r}"):
                apps.container_apps.begin_start(rg, name).result()
        plan = self.live_plan(apps, app)
        active = previous or props.get("latestRevisionName")
        if plan is not None and not plan.rolls and active:
            return self._restart_in_place(apps, rg, name, str(active), plan, timeout, summary)

        suffix = revision_suffix()
        revision = f"{name}--{suffix}"
        # only the template: the GET carries no secret values, so sending `configuration` back
        # would fail (or clear them)
        patch = {"properties": {"template": dict(props.get("template") or {})}}
        patch["properties"]["template"]["revisionSuffix"] = suffix
        self.console.print(f"Creating revision {revision} (previous: {previous or 'none'})")
        with azure_errors(f"creating revision {revision}"):
            apps.container_apps.begin_update(rg, name, patch).result()
        ready = self._wait_ready(apps, rg, name, revision, previous, timeout)
        return DeployResult(revision, config.endpoint_url, summary, replicas=ready)

    def _replicas(self, apps: Any, rg: str, name: str, revision: str) -> list[dict[str, Any]]:
        with azure_errors(f"listing the replicas of revision {revision}"):
            listing = _wire(apps.container_apps_revision_replicas.list_replicas(rg, name, revision))
        return list(listing.get("value") or [])

    def _revision_state(
        self, apps: Any, rg: str, name: str, revision: str
    ) -> tuple[dict[str, Any], tuple[Any, Any, Any]]:
        """A revision's properties and its (provisioning, running, health) states."""
        with azure_errors(f"reading revision {revision}"):
            rev = _wire(apps.container_apps_revisions.get_revision(rg, name, revision))
        p = rev.get("properties", {})
        return p, (p.get("provisioningState"), p.get("runningState"), p.get("healthState"))

    def _wait_ready(
        self, apps: Any, rg: str, name: str, revision: str, previous: str | None, timeout: float
    ) -> int:
        """Wait for a new revision; returns its running replicas. On failure or timeout the
        revision is deactivated (a failed deactivation is reported) and DeployFailedError says
        the previous one still serves."""
        endpoint = self._config().endpoint_url
        states = ""  # the last (provisioning/running/health) states seen

        def ready_replicas() -> int | None:
            nonlocal states
            p, state = self._revision_state(apps, rg, name, revision)
            states = "/".join(str(s) for s in state)
            if "Failed" in state or p.get("runningState") == "Degraded":
                raise _RevisionFailed(f"revision state {states}")
            if p.get("healthState") != "Healthy" or p.get("runningState") not in (
                "Running",
                "RunningAtMaxScale",
            ):
                return None
            health = get_json(endpoint + "/health", timeout=10)
            if not isinstance(health, dict) or health.get("revision") not in (revision, None):
                return None
            self._check_key(endpoint)
            running = [
                r
                for r in self._replicas(apps, rg, name, revision)
                if r.get("properties", {}).get("runningState") == "Running"
            ]
            return max(1, len(running))

        ready, why = self._wait(f"{revision} to be ready", ready_replicas, timeout, lambda: states)
        if ready:
            return ready
        logs = [("Last lines of its log:", self._log_tail(apps, rg, name, revision))]
        warnings = []
        try:
            with azure_errors(f"deactivating revision {revision}"):
                apps.container_apps_revisions.deactivate_revision(rg, name, revision)
        except ProviderError as exc:
            # reported, not swallowed: an active failed revision may keep a GPU node
            warning = (
                f"could not deactivate the failed revision {revision}: {exc}. It may keep a GPU "
                f"node; deactivate it with 'az containerapp revision deactivate -g {rg} -n "
                f"{name} --revision {revision}'."
            )
            self.console.print(f"[yellow]warning:[/] {warning}", markup=True, highlight=False)
            warnings.append(warning)
        raise self.not_ready(revision, why, logs, previous, warnings)

    def _restart_in_place(
        self,
        apps: Any,
        rg: str,
        name: str,
        revision: str,
        plan: GpuPlan,
        timeout: float,
        summary: str,
    ) -> DeployResult:
        """No node to spare for a new revision: restart the active one (its replicas re-run
        defaultCommands, which install and serve what was just synced)."""
        endpoint = self._config().endpoint_url
        self.console.print(
            f"[yellow]This deploy has a gap.[/] The GPU profile holds {plan.nodes} node(s) and "
            f"the app runs up to {plan.max_replicas} replica(s) of a whole node each, so no node "
            f"is free to start a new revision beside {revision}. Restarting {revision} in place: "
            f"the endpoint is down until the restarted replica is ready (minutes: the model "
            "loads again). To deploy without a gap, set maximumInstanceCount to 2 or more in "
            "infra/provision/inference.parameters.json and run 'tuneserve provision'.",
            highlight=False,
        )
        before = self._replicas(apps, rg, name, revision)
        old_names = {r.get("name") for r in before}
        old_times = [str(r.get("properties", {}).get("createdTime") or "") for r in before]
        latest_old = max(old_times, default="")

        def fresh(replica: dict[str, Any]) -> bool:
            created = str(replica.get("properties", {}).get("createdTime") or "")
            # a restart makes new replicas; compare with Azure's own clock, not ours
            return replica.get("name") not in old_names or (bool(created) and created > latest_old)

        with azure_errors(f"restarting revision {revision}"):
            apps.container_apps_revisions.restart_revision(rg, name, revision)
        restarted = ""  # "N/M": the replicas restarted so far

        def restarted_replicas() -> int | None:
            nonlocal restarted
            p, state = self._revision_state(apps, rg, name, revision)
            if "Failed" in state:
                raise _RevisionFailed(f"revision state {'/'.join(str(s) for s in state)}")
            now = self._replicas(apps, rg, name, revision)
            running = [
                r
                for r in now
                if fresh(r) and r.get("properties", {}).get("runningState") == "Running"
            ]
            restarted = f"{len(running)}/{len(now)}"
            if now and len(running) == len(now) and p.get("healthState") == "Healthy":
                if is_ready(endpoint, timeout=10):
                    self._check_key(endpoint)
                    return len(running)
            return None

        ready, why = self._wait(
            f"{revision} to restart",
            restarted_replicas,
            timeout,
            lambda: f"{restarted} replica(s) restarted",
        )
        if ready:
            return DeployResult(revision, endpoint, summary, replicas=ready)
        tail = self._log_tail(apps, rg, name, revision)
        lines = [f"deploy failed: revision {revision} did not come back after its restart: {why}."]
        lines += ["Last lines of its log:"] + [f"  | {t}" for t in tail]
        lines.append(
            f"A restart in place has no other revision to fall back to: {endpoint} is down "
            f"until {revision} recovers ('tuneserve logs --revision {revision}')."
        )
        raise DeployFailedError("\n".join(lines), previous_revision=None)

    def _wait(
        self,
        what: str,
        check: Callable[[], int | None],
        timeout: float,
        detail: Callable[[], str],
    ) -> tuple[int | None, str]:
        """Poll `check` (it raises _RevisionFailed for a state that does not recover) under a
        spinner showing `detail()`; returns its result, else None and why."""
        try:
            with self.console.status(f"Waiting for {what}") as status:
                result = wait_until(
                    check,
                    timeout=timeout,
                    interval=self.poll_s,
                    on_wait=lambda s: status.update(f"Waiting for {what} ({s:.0f} s; {detail()})"),
                )
        except _RevisionFailed as exc:
            return None, str(exc)
        return result, f"not ready after {timeout:.0f} s"

    def _check_key(self, endpoint: str) -> None:
        """Tell the user when the endpoint refuses the workspace's key (secrets changed)."""
        key = resolve_key(self.paths)
        if key is None:
            return
        try:
            code = http_get(endpoint + "/v1/models", timeout=10, api_key=key)[0]
        except OSError:
            return
        if code in (401, 403):
            self.console.print(
                f"[yellow]warning:[/] {endpoint}/v1/models refused the key of "
                f"{self.paths.rel(keys_path(self.paths))} ({code}): the app's secrets hold other "
                "keys; run 'tuneserve provision' to set them again",
                highlight=False,
            )

    def _log_tail(self, apps: Any, rg: str, name: str, revision: str) -> list[str]:
        try:
            return list(self._log_lines(apps, rg, name, revision, tail=20, follow=False))
        except (ProviderError, OSError) as exc:  # a courtesy here
            return [f"(no logs: {exc})"]

    # -- status, logs, stop --

    def status(self, *, api_key: str | None = None) -> StatusReport:
        config = self._config()
        rg, name = self._app_names()
        apps = self._apps()
        props = self._get_app(apps, rg, name).get("properties", {})
        revision = props.get("latestReadyRevisionName")
        report = StatusReport(self.name, name, config.endpoint_url, revision, ready=False)
        if revision:
            for replica in self._replicas(apps, rg, name, revision):
                rp = replica.get("properties", {})
                report.replicas.append(
                    {"name": replica.get("name"), "state": rp.get("runningState")}
                )
        if props.get("latestRevisionName") not in (None, revision):
            report.notes.append(f"latest revision {props.get('latestRevisionName')} is not ready")
        try:
            report.ready = http_get(config.endpoint_url + "/ready", timeout=10)[0] == 200
        except OSError:
            report.notes.append("the endpoint did not answer")
        if report.ready:
            report.fill_models(config.endpoint_url, resolve_key(self.paths, api_key))
        return report

    def _log_lines(
        self, apps: Any, rg: str, name: str, revision: str | None, *, tail: int, follow: bool
    ) -> Iterator[str]:
        """The log stream of every replica of the revision; prefixed with the replica's name
        when there are several. Following, the streams are read side by side (one thread each):
        a followed stream never ends, so reading them one after the other would show only the
        first replica."""
        config = self._config()
        props = self._get_app(apps, rg, name).get("properties", {})
        revision = (
            revision or props.get("latestReadyRevisionName") or props.get("latestRevisionName")
        )
        stream = str(props.get("eventStreamEndpoint") or "")
        if not stream or not revision:
            raise ProviderError(f"{name} has no log stream (no revision yet?)")
        base = stream[: stream.index("/subscriptions/")] if "/subscriptions/" in stream else stream
        with azure_errors(f"getting a log stream token for {name!r}"):
            token = _wire(apps.container_apps.get_auth_token(rg, name)).get("properties", {})
        replicas = self._replicas(apps, rg, name, revision)
        if not replicas:
            raise ProviderError(f"revision {revision} has no replicas running (scaled to zero?)")
        urls = []
        for replica in replicas:
            containers = replica.get("properties", {}).get("containers") or [{"name": "inference"}]
            urls.append(
                (
                    str(replica["name"]),
                    f"{base}/subscriptions/{config.SUBSCRIPTION_ID}/resourceGroups/{rg}"
                    f"/containerApps/{name}/revisions/{revision}/replicas/{replica['name']}"
                    f"/containers/{containers[0]['name']}/logstream"
                    f"?tailLines={tail}&follow={'true' if follow else 'false'}&output=text",
                )
            )
        headers = {"Authorization": f"Bearer {token['token']}"}
        many = len(urls) > 1
        if not follow:
            for replica_name, url in urls:
                prefix = f"[{replica_name}] " if many else ""
                with open_lines(url, headers, timeout=30) as (_, lines):
                    yield from (prefix + line for line in lines)
            return
        yield from _follow_streams(urls, headers, prefixed=many)

    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]:
        rg, name = self._app_names()
        return self._log_lines(self._apps(), rg, name, revision, tail=tail, follow=follow)

    # -- adapters at runtime (tuneserve adapters) --

    def share_target(self) -> AzureFileShareTarget:
        return AzureFileShareTarget(self._share())

    def replica_urls(self) -> list[str]:
        """The endpoint only: Container Apps does not address replicas one by one (its ingress
        picks one); the others find a new adapter folder on their next rescan of the share."""
        return [self._config().endpoint_url]

    def stop(self) -> str:
        config = self._config()
        rg, name = self._app_names()
        with azure_errors(f"stopping container app {name!r}"):
            self._apps().container_apps.begin_stop(rg, name).result()
        return f"Stopped {config.ACA_APP_NAME} (Azure: no replicas run until the next deploy)."


class _RevisionFailed(Exception):
    """A revision reached a state it does not recover from (ends a readiness wait)."""


def _follow_streams(
    urls: list[tuple[str, str]], headers: dict[str, str], *, prefixed: bool
) -> Iterator[str]:
    """Lines of several never-ending streams as they come, one reader thread per stream. A
    stream that fails ends with a line saying so; the others go on."""
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    stop = threading.Event()
    responses: list[Any] = []

    def pump(replica: str, url: str) -> None:
        try:
            with open_lines(url, headers, timeout=None) as (response, stream):
                responses.append(response)
                for line in stream:
                    if stop.is_set():
                        return
                    lines.put((replica, line))
        except (OSError, ValueError) as exc:
            if not stop.is_set():
                lines.put((replica, f"(log stream of {replica} ended: {exc})"))
        finally:
            lines.put((replica, None))

    threads = [
        threading.Thread(target=pump, args=(r, u), name=f"logs-{r}", daemon=True) for r, u in urls
    ]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            replica, line = lines.get()
            if line is None:
                running -= 1
                continue
            yield f"[{replica}] {line}" if prefixed else line
    finally:
        stop.set()
        for response in list(responses):
            with contextlib.suppress(Exception):
                response.close()
