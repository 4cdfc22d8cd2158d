"""The Azure Container Apps provider (optional extra: `pip install 'tuneserve[azure]'`).

provision  the ARM twin of infra/provision/inference.bicep (infra/provision/inference.json, else
           the packaged one) as an incremental resource-group deployment named
           "tuneserve-inference" (re-running updates it: idempotent); its outputs are the six
           config keys. Null names are left to the template (the fine-tuning step's storage
           account and share are passed when infra/finetuning.config.json names them).
deploy     sync the workspace and the tuneserve build to the Azure Files share (only changed
           files), then PATCH the app with a new `template.revisionSuffix`: in single revision
           mode Container Apps keeps the previous revision serving until the new one is ready
           (startup/readiness probes on /ready), so the switch is atomic. We wait until the
           revision is Running and Healthy and the endpoint's /health reports it; on failure or
           timeout the new revision is deactivated and the previous one goes on serving.
logs       the app's log stream (the endpoint `az containerapp logs show` uses).

Credentials: azure-identity's DefaultAzureCredential (az login, environment, managed identity).
Azure Files data access uses the same credential (token_intent="backup": the identity needs
"Storage File Data Privileged Contributor"), or the account key in AZURE_STORAGE_KEY.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneserve.deploy.base import (
    DeployResult,
    ProvisionRequest,
    StatusReport,
    deploy_sources,
    stderr_console,
)
from tuneserve.deploy.http import get_json, http_get
from tuneserve.deploy.infra import (
    BUILD_DIR,
    CONFIG_KEYS,
    InferenceConfig,
    InfraPaths,
)
from tuneserve.deploy.sync import HashCache, RemoteFile, sync
from tuneserve.errors import DeployFailedError, NotProvisionedError, ProviderError

DEPLOYMENT_NAME = "tuneserve-inference"
DEFAULT_TIMEOUT_S = 1800.0
POLL_S = 10.0


def _sdk_error(exc: ImportError) -> ProviderError:
    return ProviderError(
        f"the Azure provider needs the azure extra (missing: {exc.name}): "
        "pip install 'tuneserve[azure]'"
    )


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
            except Exception as exc:  # ResourceNotFoundError for a fresh share
                if type(exc).__name__ == "ResourceNotFoundError":
                    continue
                raise
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
        except Exception as exc:
            if type(exc).__name__ == "ResourceNotFoundError":
                return None
            raise
        return data.decode("utf-8")

    def _ensure_dir(self, rel_dir: str) -> None:
        parts = [p for p in rel_dir.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self._dirs:
                continue
            try:
                self.share.get_directory_client(sub).create_directory()
            except Exception as exc:
                if type(exc).__name__ != "ResourceExistsError":
                    raise
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
        try:
            self.share.get_file_client(rel).delete_file()
        except Exception as exc:
            if type(exc).__name__ != "ResourceNotFoundError":
                raise

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
            except Exception as exc:
                if type(exc).__name__ == "ResourceNotFoundError":
                    continue
                raise
            for item in items:
                if item.get("is_directory"):
                    sub = f"{path}/{item['name']}"
                    found.append(sub)
                    pending.append(sub)
        for path in sorted(found, key=lambda p: p.count("/"), reverse=True):
            try:
                self.share.get_directory_client(path).delete_directory()
            except Exception as exc:
                code = getattr(exc, "error_code", None)
                gone = type(exc).__name__ == "ResourceNotFoundError"
                if not gone and getattr(code, "value", code) != "DirectoryNotEmpty":
                    raise
            self._dirs.discard(path)


class AzureProvider:
    name = "azure"

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
        self.paths = paths
        self.config = config
        self.console = console or stderr_console()
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

    def _apps(self) -> Any:
        config = self._config()
        try:
            from azure.mgmt.appcontainers import ContainerAppsAPIClient
        except ImportError as exc:
            raise _sdk_error(exc) from None
        return ContainerAppsAPIClient(
            self.credential(), str(config.SUBSCRIPTION_ID), **self._kwargs()
        )

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

    def _config(self) -> InferenceConfig:
        if self.config is None:
            raise NotProvisionedError("run 'tuneserve provision' first")
        return self.config

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

    def deployment_parameters(self, request: ProvisionRequest) -> dict[str, Any]:
        values = request.parameters.values()
        params: dict[str, Any] = {
            "defaultCommands": {"value": values["defaultCommands"]},
            "maximumInstanceCount": {"value": values["maximumInstanceCount"]},
        }
        if values["location"] is not None:
            params["location"] = {"value": values["location"]}
        for name, value in request.explicit_names().items():
            params[name] = {"value": value}
        return params

    def provision(self, request: ProvisionRequest) -> InferenceConfig:
        sub, rg = request.subscription_id, request.resource_group
        groups = self._resource_client(sub).resource_groups
        if not groups.check_existence(rg):
            location = request.location or request.parameters.values()["location"]
            if not location:
                raise ProviderError(
                    f"resource group {rg!r} does not exist in subscription {sub}; pass "
                    "--location REGION to create it, or pick an existing one"
                )
            self.console.print(f"Creating resource group {rg} in {location}")
            groups.create_or_update(rg, {"location": location})
        body = {
            "properties": {
                "mode": "Incremental",
                "template": self.template(),
                "parameters": self.deployment_parameters(request),
            }
        }
        self.console.print(
            f"Deploying {DEPLOYMENT_NAME} to resource group {rg} (several minutes the first time)"
        )
        try:
            with self.console.status("Provisioning..."):
                poller = self._deployments(sub).begin_create_or_update(rg, DEPLOYMENT_NAME, body)
                result = _wire(poller.result())
        except Exception as exc:
            if type(exc).__module__.startswith("azure"):
                raise ProviderError(f"provisioning failed: {exc}") from None
            raise
        outputs = result.get("properties", {}).get("outputs") or {}
        missing = [key for key in CONFIG_KEYS if key not in outputs]
        if missing:
            raise ProviderError(f"the deployment did not output {', '.join(missing)}")
        values = {key: str(outputs[key]["value"]) for key in CONFIG_KEYS}
        self.config = InferenceConfig(**values, PROVIDER="azure")
        return self.config

    # -- deploy --

    def deploy(
        self, *, timeout: float | None = None, replicas: int | None = None, prune: bool = False
    ) -> DeployResult:
        config = self._config()
        timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        if replicas is not None:
            self.console.print(
                "note: --replicas applies to the local provider; Azure scales between 1 and "
                "maximumInstanceCount by HTTP concurrency"
            )
        target = AzureFileShareTarget(self._share())
        self.console.print(f"Syncing {self.paths.workspace} to {target.describe()}")
        result = sync(
            deploy_sources(self.paths),
            target,
            hash_cache=HashCache(self.paths.state / "hashes.json"),
            prune=prune,
            keep=[BUILD_DIR],
            console=self.console,
        )
        self.console.print(f"  {result.summary()}")

        rg, name = str(config.RESOURCE_GROUP_NAME), str(config.ACA_APP_NAME)
        apps = self._apps()
        app = _wire(apps.container_apps.get(rg, name))
        props = app.get("properties", {})
        previous = props.get("latestReadyRevisionName")
        if props.get("runningStatus") == "Stopped":
            apps.container_apps.begin_start(rg, name).result()
        suffix = "d" + datetime.now(UTC).strftime("%y%m%d%H%M%S")
        revision = f"{name}--{suffix}"
        patch = {"properties": {"template": dict(props.get("template") or {})}}
        patch["properties"]["template"]["revisionSuffix"] = suffix
        self.console.print(f"Creating revision {revision} (previous: {previous or 'none'})")
        apps.container_apps.begin_update(rg, name, patch).result()
        self._wait_ready(apps, rg, name, revision, previous, timeout)
        return DeployResult(revision, config.endpoint_url, result.summary())

    def _wait_ready(
        self, apps: Any, rg: str, name: str, revision: str, previous: str | None, timeout: float
    ) -> None:
        start = time.monotonic()
        why = "timed out"
        endpoint = self._config().endpoint_url
        with self.console.status(f"Waiting for {revision} to be ready") as status:
            while time.monotonic() - start < timeout:
                rev = _wire(apps.container_apps_revisions.get_revision(rg, name, revision))
                p = rev.get("properties", {})
                state = (p.get("provisioningState"), p.get("runningState"), p.get("healthState"))
                if "Failed" in state or p.get("runningState") == "Degraded":
                    why = f"revision state {'/'.join(str(s) for s in state)}"
                    break
                if p.get("healthState") == "Healthy" and p.get("runningState") in (
                    "Running",
                    "RunningAtMaxScale",
                ):
                    health = get_json(endpoint + "/health", timeout=10)
                    if isinstance(health, dict) and health.get("revision") in (revision, None):
                        return
                status.update(
                    f"Waiting for {revision} to be ready ({time.monotonic() - start:.0f} s; "
                    f"{'/'.join(str(s) for s in state)})"
                )
                time.sleep(self.poll_s)
            else:
                why = f"not ready after {timeout:.0f} s"
        tail = []
        try:
            tail = list(self._log_lines(apps, rg, name, revision, tail=20, follow=False))
        except Exception as exc:  # logs are a courtesy here
            tail = [f"(no logs: {exc})"]
        try:
            apps.container_apps_revisions.deactivate_revision(rg, name, revision)
        except Exception:
            pass
        lines = [f"deploy failed: revision {revision} did not become ready: {why}."]
        lines += ["Last lines of its log:"] + [f"  | {t}" for t in tail]
        lines.append(
            f"The previous revision {previous} is still serving at {endpoint}."
            if previous
            else "No previous revision is serving."
        )
        raise DeployFailedError("\n".join(lines), previous_revision=previous)

    # -- status, logs, stop --

    def status(self, *, api_key: str | None = None) -> StatusReport:
        config = self._config()
        rg, name = str(config.RESOURCE_GROUP_NAME), str(config.ACA_APP_NAME)
        apps = self._apps()
        props = _wire(apps.container_apps.get(rg, name)).get("properties", {})
        revision = props.get("latestReadyRevisionName")
        report = StatusReport("azure", name, config.endpoint_url, revision, ready=False)
        if revision:
            replicas = apps.container_apps_revision_replicas.list_replicas(rg, name, revision)
            for replica in _wire(replicas).get("value", []):
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
            from tuneserve.deploy.local import _fill_models

            _fill_models(report, config.endpoint_url, api_key)
        return report

    def _log_lines(
        self, apps: Any, rg: str, name: str, revision: str | None, *, tail: int, follow: bool
    ) -> Iterator[str]:
        config = self._config()
        props = _wire(apps.container_apps.get(rg, name)).get("properties", {})
        revision = (
            revision or props.get("latestReadyRevisionName") or props.get("latestRevisionName")
        )
        stream = str(props.get("eventStreamEndpoint") or "")
        if not stream or not revision:
            raise ProviderError(f"{name} has no log stream (no revision yet?)")
        base = stream[: stream.index("/subscriptions/")] if "/subscriptions/" in stream else stream
        token = _wire(apps.container_apps.get_auth_token(rg, name)).get("properties", {})["token"]
        replicas = _wire(apps.container_apps_revision_replicas.list_replicas(rg, name, revision))
        for replica in replicas.get("value", []):
            containers = replica.get("properties", {}).get("containers") or [{"name": "inference"}]
            url = (
                f"{base}/subscriptions/{config.SUBSCRIPTION_ID}/resourceGroups/{rg}"
                f"/containerApps/{name}/revisions/{revision}/replicas/{replica['name']}"
                f"/containers/{containers[0]['name']}/logstream"
                f"?tailLines={tail}&follow={'true' if follow else 'false'}&output=text"
            )
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=None if follow else 30) as response:
                for raw in response:
                    yield raw.decode("utf-8", errors="replace").rstrip("\n")

    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]:
        config = self._config()
        return self._log_lines(
            self._apps(),
            str(config.RESOURCE_GROUP_NAME),
            str(config.ACA_APP_NAME),
            revision,
            tail=tail,
            follow=follow,
        )

    # -- adapters at runtime (tuneserve adapters) --

    def share_target(self) -> AzureFileShareTarget:
        return AzureFileShareTarget(self._share())

    def replica_urls(self) -> list[str]:
        """The endpoint only: Container Apps does not address replicas one by one (its ingress
        picks one); the others find a new adapter folder on their next rescan of the share."""
        return [self._config().endpoint_url]

    def stop(self) -> str:
        config = self._config()
        self._apps().container_apps.begin_stop(
            str(config.RESOURCE_GROUP_NAME), str(config.ACA_APP_NAME)
        ).result()
        return f"Stopped {config.ACA_APP_NAME} (Azure: no replicas run until the next deploy)."
