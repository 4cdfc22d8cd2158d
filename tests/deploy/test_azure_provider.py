"""The Azure provider's calls, made by the real azure SDK clients, against a loopback STAND-IN of
the ARM and File REST endpoints (tests/deploy/azure_standin.py). It checks what we send and how
we read the answers, and runs the template's own expressions the way ARM would read them; it
cannot check Azure itself (that needs a real subscription)."""

from __future__ import annotations

import inspect
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.mgmt.appcontainers")
pytest.importorskip("azure.storage.fileshare")

from azure.core.credentials import AccessToken  # noqa: E402
from azure.core.exceptions import HttpResponseError  # noqa: E402
from azure.core.pipeline.policies import SansIOHTTPPolicy  # noqa: E402
from rich.console import Console  # noqa: E402

from tests.deploy import azure_standin  # noqa: E402
from tests.deploy.azure_standin import Fault, StandIn  # noqa: E402
from tuneserve.deploy import azure  # noqa: E402
from tuneserve.deploy.azure import (  # noqa: E402
    AzureProvider,
    AzureProvisionRequest,
    packaged_template,
    revision_suffix,
)
from tuneserve.deploy.infra import (  # noqa: E402
    FinetuningConfig,
    InferenceConfig,
    InfraPaths,
    load_finetuning_names,
    load_parameters,
)
from tuneserve.deploy.keys import EndpointKeys, save_keys  # noqa: E402
from tuneserve.deploy.naming import REVISION_SUFFIX, derived_names  # noqa: E402
from tuneserve.deploy.scaffold import init_workspace  # noqa: E402
from tuneserve.errors import DeployFailedError, InfraFileError, ProviderError  # noqa: E402

KEYS = EndpointKeys(api_key="ts-api-stand-in", admin_key="ts-admin-stand-in")


class StandInAuth(SansIOHTTPPolicy):
    """Sends the bearer header like the ARM policy, minus its https-only check (loopback http)."""

    def on_request(self, request: Any) -> None:
        request.http_request.headers["Authorization"] = "Bearer stand-in"


class FakeCredential:
    """A token credential that never talks to Entra ID."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("stand-in", int(time.time()) + 3600)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    state = StandIn()
    server, thread = azure_standin.start(state)
    yield state
    state.stop_streams.set()
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
    save_keys(InfraPaths(ws), KEYS)  # what `tuneserve provision` keeps in .tuneserve/keys.json
    return ws


def _provider(
    ws: Path,
    standin: StandIn,
    monkeypatch: pytest.MonkeyPatch,
    config: Any = None,
    console: Console | None = None,
) -> AzureProvider:
    monkeypatch.setenv("AZURE_STORAGE_KEY", "c3RhbmQtaW4=")  # shared key: http is allowed
    monkeypatch.delenv("TUNESERVE_API_KEY", raising=False)
    monkeypatch.delenv("TUNESERVE_ADMIN_KEY", raising=False)
    return AzureProvider(
        InfraPaths(ws),
        config,
        console,
        credential=FakeCredential(),
        arm_endpoint=standin.url,
        storage_url=f"{standin.url}/{azure_standin.ACCOUNT}",
        client_kwargs={"authentication_policy": StandInAuth(), "retry_total": 0},
        poll_s=0.01,
    )


def _request(ws: Path, **kw: Any) -> AzureProvisionRequest:
    params = load_parameters(ws / "infra" / "provision" / "inference.parameters.json")
    kw.setdefault("keys", KEYS)
    return AzureProvisionRequest(
        subscription_id="sub-1", resource_group="rg-1", parameters=params, **kw
    )


def _at_standin(config: InferenceConfig, standin: StandIn) -> InferenceConfig:
    """The config with its endpoint resolved to the stand-in's app, as DNS would resolve the
    FQDN the template outputs."""
    return config.model_copy(update={"ACA_APP_ENDPOINT": f"{standin.url}/app"})


def _provisioned(
    ws: Path,
    standin: StandIn,
    monkeypatch: pytest.MonkeyPatch,
    console: Console | None = None,
    **kw: Any,
) -> AzureProvider:
    standin.groups.add("rg-1")
    config = _provider(ws, standin, monkeypatch).provision(_request(ws, **kw))
    return _provider(ws, standin, monkeypatch, _at_standin(config, standin), console)


def _recording() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400, highlight=False, color_system=None), out


def _set_parameter(ws: Path, name: str, value: Any) -> None:
    path = ws / "infra" / "provision" / "inference.parameters.json"
    data = json.loads(path.read_text())
    data["parameters"][name] = {"value": value}
    path.write_text(json.dumps(data, indent=2))


# --- provision ---------------------------------------------------------------------------------


def test_provision_deploys_the_arm_template_idempotently(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
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
    # null names are left to the template; commands, count and the keys always go
    assert set(body["parameters"]) == {
        "defaultCommands",
        "maximumInstanceCount",
        "apiKey",
        "adminKey",
    }
    derived = derived_names("sub-1", "rg-1")  # what the template derived (the stand-in ran it)
    assert config.ACA_APP_NAME == derived.acaAppName
    assert config.STORAGE_ACCOUNT_NAME == derived.storageAccountName

    # again, with the fine-tuning step's share: same deployment name (updates, idempotent)
    ft = FinetuningConfig(
        SUBSCRIPTION_ID="sub-1",
        RESOURCE_GROUP_NAME="rg-1",
        STORAGE_ACCOUNT_NAME="ftstore",
        FILE_SHARE_NAME="ftshare",
    )
    config = provider.provision(_request(workspace, finetuning=ft))
    body = standin.calls("PUT", r"/deployments/tuneserve-inference$")[1].body["properties"]
    assert body["parameters"]["storageAccountName"] == {"value": "ftstore"}
    assert body["parameters"]["fileShareName"] == {"value": "ftshare"}
    assert config.FILE_SHARE_NAME == "ftshare"


def test_provision_keeps_the_config_exactly_as_the_template_outputs_it(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in evaluates the template's outputs (and, like ARM at times, lowercases the
    first letter of their names): the config holds those values, the endpoint being the bare
    ingress FQDN, which endpoint_url reads as https."""
    standin.groups.add("rg-1")
    config = _provider(workspace, standin, monkeypatch).provision(_request(workspace))
    assert "aCA_APP_ENDPOINT" in standin.outputs  # the names came back case-mangled
    app = derived_names("sub-1", "rg-1").acaAppName
    fqdn = standin.app["properties"]["configuration"]["ingress"]["fqdn"]
    assert fqdn == f"{app}.stand-in.invalid"
    assert config.ACA_APP_ENDPOINT == fqdn == standin.outputs["aCA_APP_ENDPOINT"]["value"]
    assert config.endpoint_url == f"https://{fqdn}"
    assert json.loads(config.to_json())["ACA_APP_ENDPOINT"] == fqdn


def test_keys_go_as_secure_parameters_and_become_container_secrets(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    params_file = workspace / "infra" / "provision" / "inference.parameters.json"
    before = params_file.read_text()
    provider = _provisioned(workspace, standin, monkeypatch)
    # the replica's environment holds the keys, through secretRef to the app's secrets
    assert standin.env_var("TUNESERVE_API_KEY") == KEYS.api_key
    assert standin.env_var("TUNESERVE_ADMIN_KEY") == KEYS.admin_key
    assert {s["name"] for s in standin.app["properties"]["configuration"]["secrets"]} == {
        "api-key",
        "admin-key",
    }
    assert "value" not in json.dumps(standin.app["properties"]["configuration"]["secrets"])
    assert params_file.read_text() == before  # the nine-parameter file never holds a key
    assert KEYS.api_key not in before

    # a deployment without the keys is refused, naming the parameter (as a hand deploy would be)
    body = {"properties": {"mode": "Incremental", "template": packaged_template()}}
    body["properties"]["parameters"] = {"defaultCommands": {"value": ["true"]}}
    with pytest.raises(HttpResponseError, match="apiKey"):
        provider._deployments("sub-1").begin_create_or_update("rg-1", "by-hand", body).result()
    with pytest.raises(ProviderError, match="apiKey and adminKey"):
        provider.provision(_request(workspace, keys=None))

    # status and the readiness checks send the workspace's key: /v1 answers
    status = provider.status()
    assert status.ready and status.adapters == ["pirate"]
    v1 = standin.calls("GET", r"^/app/v1/models$")
    assert v1 and v1[-1].method == "GET"


def test_an_older_workspace_template_without_the_keys_is_refused_clearly(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workspace's inference.json from before the keys: provision names what it lacks
    instead of deploying an open endpoint."""
    old = packaged_template()
    for name in ("apiKey", "adminKey", "gpuProfileMaximumCount"):
        del old["parameters"][name]
    (workspace / "infra" / "provision" / "inference.json").write_text(json.dumps(old))
    standin.groups.add("rg-1")
    with pytest.raises(ProviderError) as info:
        _provider(workspace, standin, monkeypatch).provision(_request(workspace))
    message = str(info.value)
    assert "infra/provision/inference.json does not declare" in message
    assert "adminKey, apiKey" in message and "delete infra/provision/inference.json" in message
    assert standin.calls("PUT", r"/deployments/") == []


def test_a_shared_environments_gpu_profile_is_never_lowered(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = derived_names("sub-1", "rg-1").acaEnvironmentName
    standin.seed_environment(env, gpu_maximum_count=4)  # fine-tuning's, with 4 GPU nodes
    console, out = _recording()
    standin.groups.add("rg-1")
    _provider(workspace, standin, monkeypatch, console=console).provision(_request(workspace))
    params = standin.calls("PUT", r"/deployments/")[-1].body["properties"]["parameters"]
    assert params["gpuProfileMaximumCount"] == {"value": 4}
    profiles = standin.environments[env]["properties"]["workloadProfiles"]
    assert next(p for p in profiles if p["name"] == "GPU")["maximumCount"] == 4  # as evaluated
    assert standin.app["properties"]["template"]["scale"]["maxReplicas"] == 1
    text = out.getvalue()
    assert f"{env}" in text and "keeps its GPU profile's maximumCount of 4" in text

    # a smaller profile grows to maximumInstanceCount (and says so); nothing extra is passed
    standin.seed_environment(env, gpu_maximum_count=1)
    _provider(workspace, standin, monkeypatch, console=console).provision(_request(workspace))
    params = standin.calls("PUT", r"/deployments/")[-1].body["properties"]["parameters"]
    assert "gpuProfileMaximumCount" not in params
    profiles = standin.environments[env]["properties"]["workloadProfiles"]
    assert next(p for p in profiles if p["name"] == "GPU")["maximumCount"] == 2
    assert "grows from 1 to 2 nodes" in out.getvalue()


def test_fine_tuning_resources_are_reused_only_in_their_scope(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    ft_params = workspace / "infra" / "provision" / "finetuning.parameters.json"
    ft_params.write_text(
        json.dumps(
            {
                "parameters": {
                    "defaultCommands": {"value": ["cd /mount"]},
                    "maximumInstanceCount": {"value": 2},
                    "storageAccountName": {"value": None},
                    "acaEnvironmentName": {"value": "ftenv"},
                    "acaJobName": {"value": "ftjob"},
                    "acaLogAnalyticsName": {"value": "ftlogs"},
                }
            }
        )
    )
    names = load_finetuning_names(ft_params)
    assert names == {"acaEnvironmentName": "ftenv", "acaLogAnalyticsName": "ftlogs"}
    ft = FinetuningConfig(
        SUBSCRIPTION_ID="sub-1",
        RESOURCE_GROUP_NAME="rg-1",
        STORAGE_ACCOUNT_NAME="ftstore",
        FILE_SHARE_NAME="ftshare",
    )
    standin.groups.update({"rg-1", "rg-2"})
    console, out = _recording()
    provider = _provider(workspace, standin, monkeypatch, console=console)

    provider.provision(_request(workspace, finetuning=ft, finetuning_names=names))
    params = standin.calls("PUT", r"/deployments/")[-1].body["properties"]["parameters"]
    assert {k: v["value"] for k, v in params.items() if k.endswith("Name")} == {
        "storageAccountName": "ftstore",
        "fileShareName": "ftshare",
        "acaEnvironmentName": "ftenv",
        "acaLogAnalyticsName": "ftlogs",
    }
    assert "not reusing" not in out.getvalue()

    # another resource group: nothing of fine-tuning's is passed (storage names are global)
    request = _request(workspace, finetuning=ft, finetuning_names=names)
    request.resource_group = "rg-2"
    config = provider.provision(request)
    params = standin.calls("PUT", r"/deployments/")[-1].body["properties"]["parameters"]
    assert not [k for k in params if k.endswith("Name")]
    assert config.STORAGE_ACCOUNT_NAME == derived_names("sub-1", "rg-2").storageAccountName
    text = out.getvalue()
    assert "not reusing the fine-tuning step's resources" in text
    assert "resource group rg-1" in text and "resource group rg-2" in text

    # a name the file gives must be one Azure accepts
    ft_params.write_text('{"parameters": {"storageAccountName": {"value": "Bad_Name"}}}')
    with pytest.raises(InfraFileError, match=r"line 1: parameters.storageAccountName.value"):
        load_finetuning_names(ft_params)
    assert load_finetuning_names(workspace / "absent.json") == {}


# --- deploy --------------------------------------------------------------------------------------


def test_deploy_syncs_changed_files_and_rolls_a_new_revision(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _provisioned(workspace, standin, monkeypatch)
    config = provider._config()
    share = config.FILE_SHARE_NAME

    result = provider.deploy(timeout=10)
    assert standin.files[f"{share}/notes.txt"] == b"hello"
    assert standin.files[f"{share}/models/pirate/adapter_config.json"] == b'{"r": 8}'
    assert f"{share}/.tuneserve-build/pyproject.toml" in standin.files
    assert f"{share}/infra/inference.config.json" not in standin.files  # infra/ is not synced
    assert f"{share}/.tuneserve/keys.json" not in standin.files  # nor the keys
    patch = standin.calls("PATCH", r"/containerApps/")[-1].body
    assert set(patch["properties"]) == {"template"}  # no configuration: its secrets stay
    suffix = patch["properties"]["template"]["revisionSuffix"]
    assert result.revision == f"{config.ACA_APP_NAME}--{suffix}" == standin.serving()
    assert result.endpoint == config.endpoint_url
    assert standin.restarted == []  # two nodes (the default): a new revision, no restart

    # only the changed file is uploaded the second time
    uploads_before = len(standin.calls("PUT", r"/notes.txt$"))
    adapter_puts = len(standin.calls("PUT", r"adapter_config.json$"))
    (workspace / "notes.txt").write_text("changed")
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


def test_revision_suffixes_differ_within_one_second(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deploys in the same second (the clock frozen) make two revisions; the stand-in, like
    Container Apps, refuses a suffix it has seen."""
    provider = _provisioned(workspace, standin, monkeypatch)
    frozen = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    monkeypatch.setattr(azure, "_utcnow", lambda: frozen)
    first = provider.deploy(timeout=10).revision
    second = provider.deploy(timeout=10).revision
    assert first != second and standin.serving() == second
    suffixes = [
        c.body["properties"]["template"]["revisionSuffix"]
        for c in standin.calls("PATCH", r"/containerApps/")
    ]
    assert all(s.startswith("d260301120000") for s in suffixes)
    assert len({revision_suffix(frozen) for _ in range(50)}) == 50
    assert all(REVISION_SUFFIX.check(s) is None for s in suffixes)


def test_single_node_deploy_restarts_in_place_and_says_there_is_a_gap(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_parameter(workspace, "maximumInstanceCount", 1)
    console, out = _recording()
    provider = _provisioned(workspace, standin, monkeypatch, console=console)
    serving = standin.serving()
    assert serving is not None
    old_replicas = [r["name"] for r in standin.replicas[serving]]

    result = provider.deploy(timeout=10)
    assert standin.calls("PATCH", r"/containerApps/") == []  # no revision could ever start
    assert standin.restarted == [serving] and result.revision == serving
    assert not set(old_replicas) & {r["name"] for r in standin.replicas[serving]}
    assert standin.files[f"{provider._config().FILE_SHARE_NAME}/notes.txt"] == b"hello"
    text = out.getvalue()
    assert "This deploy has a gap" in text and "the endpoint is down until" in text
    assert "maximumInstanceCount to 2 or more" in text

    standin.fail_restart = True
    with pytest.raises(DeployFailedError) as info:
        provider.deploy(timeout=10)
    message = str(info.value)
    assert "did not come back after its restart" in message
    assert "no other revision to fall back to" in message and "line two" in message


def test_failed_revision_leaves_the_previous_one_serving(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _provisioned(workspace, standin, monkeypatch)
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


def test_a_failed_deactivation_is_reported(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    console, out = _recording()
    provider = _provisioned(workspace, standin, monkeypatch, console=console)
    standin.fail_next_revision = True
    standin.faults.append(Fault("POST", r"/deactivate$", 409, "RevisionBusy", "busy right now"))
    with pytest.raises(DeployFailedError) as info:
        provider.deploy(timeout=10)
    failed = standin.app["properties"]["latestRevisionName"]
    text = out.getvalue()
    assert f"could not deactivate the failed revision {failed}" in text
    assert "RevisionBusy" in text and "busy right now" in text
    assert f"could not deactivate the failed revision {failed}" in str(info.value)
    assert standin.deactivated == []


def test_logs_follow_streams_every_replica(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Followed streams never end: each replica's must show while the others stay open."""
    standin.replicas_per_revision = 2
    provider = _provisioned(workspace, standin, monkeypatch)
    replicas = [r["name"] for r in standin.replicas[str(standin.serving())]]
    assert len(replicas) == 2
    assert sorted(provider.logs(tail=5)) == sorted(
        f"[{r}] line {n}" for r in replicas for n in ("one", "two")
    )

    lines: list[str] = []
    stream = provider.logs(tail=5, follow=True)

    def read() -> None:
        for line in stream:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    wanted = {f"[{r}] {r} says {n}" for r in replicas for n in ("one", "two")}
    while time.monotonic() < deadline and not wanted <= set(lines):
        time.sleep(0.02)
    assert wanted <= set(lines), lines  # both replicas while both streams are still open
    standin.stop_streams.set()  # the streams end: so does the iterator
    reader.join(timeout=10)
    assert not reader.is_alive()


def test_azure_errors_are_caught_by_type(
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.groups.add("rg-1")
    provider = _provider(workspace, standin, monkeypatch)
    standin.faults.append(Fault("PUT", r"/deployments/", 401, "InvalidAuthenticationToken"))
    with pytest.raises(ProviderError, match=r"did not accept the credentials.*az login"):
        provider.provision(_request(workspace))

    standin.faults.append(
        Fault("PUT", r"/deployments/", 400, "InvalidTemplateDeployment", "quota exceeded")
    )
    with pytest.raises(ProviderError) as info:
        provider.provision(_request(workspace))
    assert "provisioning (deployment tuneserve-inference in resource group rg-1)" in str(info.value)
    assert "HTTP 400 InvalidTemplateDeployment: quota exceeded" in str(info.value)

    config = provider.provision(_request(workspace))
    missing = _at_standin(config, standin).model_copy(update={"ACA_APP_NAME": "gone"})
    provider = _provider(workspace, standin, monkeypatch, missing)
    with pytest.raises(ProviderError) as info:
        provider.status()
    message = str(info.value)
    assert "container app 'gone'" in message and "not found" in message
    assert "Run 'tuneserve provision'" in message and "ACA_APP_NAME" in message
    # the provider recognises errors by their azure.core.exceptions types, not by names
    assert not re.search(r"__name__\s*[!=]=|__name__\s+in\b", inspect.getsource(azure))


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
    workspace: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tuneserve adapters` in workspace mode on Azure, against the STAND-IN (not Azure): the
    upload into a hidden staging folder moved to models/NAME/ by Rename Directory (the old one
    set aside first, then deleted), the endpoint told (with the admin key), remove clearing the
    folder (files, then the emptied directories) and unloading."""
    from tuneserve.deploy.adapters import (
        AdminClient,
        deployment,
        push_to_deployment,
        remove_from_deployment,
    )

    provider = _provisioned(workspace, standin, monkeypatch)
    config = provider._config()
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

    with AdminClient(KEYS.admin_key) as client:
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
