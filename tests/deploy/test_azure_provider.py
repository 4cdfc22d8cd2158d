"""The Azure provider's calls, made by the real azure SDK clients, against a loopback STAND-IN of
the ARM and File REST endpoints (tests/deploy/azure_standin.py). It checks what we send and how
we read the answers; it cannot check Azure itself (that needs a real subscription)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.mgmt.appcontainers")
pytest.importorskip("azure.storage.fileshare")

from azure.core.credentials import AccessToken  # noqa: E402
from azure.core.pipeline.policies import SansIOHTTPPolicy  # noqa: E402

from tests.deploy import azure_standin  # noqa: E402
from tuneserve.deploy.azure import AzureProvider, packaged_template  # noqa: E402
from tuneserve.deploy.base import ProvisionRequest  # noqa: E402
from tuneserve.deploy.infra import InfraPaths, load_parameters  # noqa: E402
from tuneserve.deploy.scaffold import init_workspace  # noqa: E402
from tuneserve.errors import DeployFailedError, ProviderError  # noqa: E402


class StandInAuth(SansIOHTTPPolicy):  # type: ignore[type-arg]
    """Sends the bearer header like the ARM policy, minus its https-only check (loopback http)."""

    def on_request(self, request: Any) -> None:
        request.http_request.headers["Authorization"] = "Bearer stand-in"


class FakeCredential:
    """A token credential that never talks to Entra ID."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("stand-in", int(time.time()) + 3600)


@pytest.fixture
def standin() -> Iterator[azure_standin.StandIn]:
    state = azure_standin.StandIn()
    server, thread = azure_standin.start(state)
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    init_workspace(ws)
    (ws / "models" / "pirate").mkdir(parents=True)
    (ws / "models" / "pirate" / "adapter_config.json").write_text('{"r": 8}')
    (ws / "notes.txt").write_text("hello")
    return ws


def _provider(
    ws: Path, standin: azure_standin.StandIn, monkeypatch: pytest.MonkeyPatch, config: Any = None
) -> AzureProvider:
    monkeypatch.setenv("AZURE_STORAGE_KEY", "c3RhbmQtaW4=")  # shared key: http is allowed
    return AzureProvider(
        InfraPaths(ws),
        config,
        credential=FakeCredential(),
        arm_endpoint=standin.url,
        storage_url=f"{standin.url}/{azure_standin.ACCOUNT}",
        client_kwargs={"authentication_policy": StandInAuth(), "retry_total": 0},
        poll_s=0.01,
    )


def _request(ws: Path, **kw: Any) -> ProvisionRequest:
    params = load_parameters(ws / "infra" / "provision" / "inference.parameters.json")
    return ProvisionRequest(subscription_id="sub-1", resource_group="rg-1", parameters=params, **kw)


def test_provision_deploys_the_arm_template_idempotently(
    workspace: Path, standin: azure_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _provider(workspace, standin, monkeypatch)
    with pytest.raises(ProviderError, match="pass --location"):
        provider.provision(_request(workspace))
    config = provider.provision(_request(workspace, location="westus3"))
    assert standin.calls("PUT", r"resourcegroups/rg-1$")[0].body == {"location": "westus3"}
    assert config.PROVIDER == "azure" and config.SUBSCRIPTION_ID == "sub-1"
    put = standin.calls("PUT", r"/deployments/tuneserve-inference$")
    body = put[0].body["properties"]
    assert body["mode"] == "Incremental"
    assert body["template"] == packaged_template()
    # null names are left to the template; commands and count always go
    assert set(body["parameters"]) == {"defaultCommands", "maximumInstanceCount"}

    # again, with the fine-tuning step's share: same deployment name (updates, idempotent)
    from tuneserve.deploy.infra import FinetuningConfig

    ft = FinetuningConfig(STORAGE_ACCOUNT_NAME="ftstore", FILE_SHARE_NAME="ftshare")
    config = provider.provision(_request(workspace, finetuning=ft))
    body = standin.calls("PUT", r"/deployments/tuneserve-inference$")[1].body["properties"]
    assert body["parameters"]["storageAccountName"] == {"value": "ftstore"}
    assert body["parameters"]["fileShareName"] == {"value": "ftshare"}
    assert config.FILE_SHARE_NAME == "ftshare"


def test_deploy_syncs_changed_files_and_rolls_a_new_revision(
    workspace: Path, standin: azure_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.groups.add("rg-1")
    provider = _provider(workspace, standin, monkeypatch)
    config = provider.provision(_request(workspace))
    provider = _provider(workspace, standin, monkeypatch, config)
    share = config.FILE_SHARE_NAME

    result = provider.deploy(timeout=10)
    assert standin.files[f"{share}/notes.txt"] == b"hello"
    assert standin.files[f"{share}/models/pirate/adapter_config.json"] == b'{"r": 8}'
    assert f"{share}/.tuneserve-build/pyproject.toml" in standin.files
    assert f"{share}/infra/inference.config.json" not in standin.files  # infra/ is not synced
    patch = standin.calls("PATCH", r"/containerApps/")[-1].body
    suffix = patch["properties"]["template"]["revisionSuffix"]
    assert result.revision == f"{config.ACA_APP_NAME}--{suffix}" == standin.serving()
    assert result.endpoint == config.endpoint_url

    # only the changed file is uploaded the second time
    uploads_before = len(standin.calls("PUT", r"/notes.txt$"))
    adapter_puts = len(standin.calls("PUT", r"adapter_config.json$"))
    (workspace / "notes.txt").write_text("changed")
    time.sleep(1.1)  # a new revision suffix (one per second)
    calls_before = len(standin.requests)
    result = provider.deploy(timeout=10)
    created = {  # files (re)created by the second sync, leaving out the tuneserve build, which
        # changes when someone edits tuneserve's source meanwhile
        r.path.split(f"/{share}/", 1)[1]
        for r in standin.requests[calls_before:]
        if r.method == "PUT" and not r.query and ".tuneserve-build/" not in r.path
    }
    assert created == {"notes.txt", ".tuneserve/manifest.json"}
    assert standin.files[f"{share}/notes.txt"] == b"changed"
    assert len(standin.calls("PUT", r"/notes.txt$")) > uploads_before
    assert len(standin.calls("PUT", r"adapter_config.json$")) == adapter_puts  # untouched

    status = provider.status()
    assert status.revision == result.revision and status.ready
    assert status.adapters == ["pirate"] and status.replicas[0]["state"] == "Running"


def test_failed_revision_leaves_the_previous_one_serving(
    workspace: Path, standin: azure_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.groups.add("rg-1")
    config = _provider(workspace, standin, monkeypatch).provision(_request(workspace))
    provider = _provider(workspace, standin, monkeypatch, config)
    previous = standin.serving()
    standin.fail_next_revision = True
    with pytest.raises(DeployFailedError) as info:
        provider.deploy(timeout=10)
    message = str(info.value)
    assert "revision state Failed" in message
    assert f"previous revision {previous} is still serving" in message
    assert "line two" in message  # the log stream's tail
    assert standin.deactivated == [standin.app["properties"]["latestRevisionName"]]
    assert standin.serving() == previous
    assert list(provider.logs(tail=5)) == ["line one", "line two"]
    token_call = standin.calls("POST", r"/getAuthtoken$")
    assert token_call


def test_missing_sdk_is_a_clear_error(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("azure.identity"):
            raise ImportError("no azure", name="azure.identity")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    provider = AzureProvider(InfraPaths(workspace), None)
    with pytest.raises(ProviderError, match=r"pip install 'tuneserve\[azure\]'"):
        provider.credential()


def test_packaged_template_parameters_file_is_valid_json(workspace: Path) -> None:
    text = (workspace / "infra" / "provision" / "inference.json").read_text()
    assert json.loads(text) == packaged_template()


def test_adapters_push_and_remove_through_the_share(
    workspace: Path, standin: azure_standin.StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tuneserve adapters` in workspace mode on Azure, against the STAND-IN (not Azure): the
    upload into a hidden staging folder moved to models/NAME/ by Rename Directory (the old one
    set aside first, then deleted), the endpoint told, remove clearing the folder (files, then
    the emptied directories) and unloading."""
    from rich.console import Console

    from tuneserve.deploy.adapters import (
        AdminClient,
        deployment,
        push_to_deployment,
        remove_from_deployment,
    )

    standin.groups.add("rg-1")
    config = _provider(workspace, standin, monkeypatch).provision(_request(workspace))
    provider = _provider(workspace, standin, monkeypatch, config)
    provider.deploy(timeout=10)  # the workspace's own adapter, models/pirate, is on the share
    target = deployment(provider, config.endpoint_url)
    assert target.replicas == [config.endpoint_url]
    share, console = config.FILE_SHARE_NAME, Console(stderr=True)
    models = f"{share}/models"

    def adapter(folder: Path, weights: bytes, extra: bool = False) -> Path:
        folder.mkdir()
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        (folder / "adapter_model.safetensors").write_bytes(weights)
        if extra:
            (folder / "extra").mkdir()
            (folder / "extra" / "notes.txt").write_text("old")
        return folder

    def under_models() -> list[str]:
        return sorted(f.removeprefix(models + "/") for f in standin.files if f.startswith(models))

    with AdminClient(None) as client:
        report = push_to_deployment(
            client, target, "support", adapter(workspace.parent / "v1", b"w1", extra=True), console
        )
        uploads = [r.path for r in standin.requests if r.method == "PUT" and not r.query]
        assert all("/models/.support." in p for p in uploads if "/models/s" in p)  # staged aside
        assert standin.calls("PUT", r"/models/support$")  # then moved in by one rename
        assert under_models() == [
            "pirate/adapter_config.json",
            "support/adapter_config.json",
            "support/adapter_model.safetensors",
            "support/extra/notes.txt",
        ]
        assert standin.adapters == {"support": "support"}
        assert [(r.outcome, report.replaced) for r in report.replicas] == [("loaded", False)]
        assert any("next rescan" in note for note in report.notes)

        # replace: the old folder is swapped out whole and deleted; nothing hidden is left
        report = push_to_deployment(
            client, target, "support", adapter(workspace.parent / "v2", b"w2"), console
        )
        assert report.replaced and report.replicas[0].outcome == "replaced"
        assert under_models() == [
            "pirate/adapter_config.json",
            "support/adapter_config.json",
            "support/adapter_model.safetensors",
        ]
        assert standin.files[f"{models}/support/adapter_model.safetensors"] == b"w2"
        assert not [d for d in standin.dirs if "/models/." in d]

        report = remove_from_deployment(client, target, "support")
    assert report.folder == f"{config.STORAGE_ACCOUNT_NAME}/{share}/models/support"
    assert under_models() == ["pirate/adapter_config.json"]
    assert not [d for d in standin.dirs if "/models/support" in d]
    assert standin.adapters == {} and report.replicas[0].outcome == "removed"
