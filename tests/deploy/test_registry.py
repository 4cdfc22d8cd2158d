"""The provider registry: --provider's choices and help, each provider's own provision flags, and
that a new provider plugs in by being listed (a made-up one here, driven through the CLI)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tuneserve.cli import deploy as deploy_cli
from tuneserve.deploy import registry
from tuneserve.deploy.azure import AzureProvider, AzureProvisionRequest
from tuneserve.deploy.base import DeployResult, Provider, ProvisionRequest, StatusReport, option
from tuneserve.deploy.infra import DEFAULT_PROVIDER, InferenceConfig, load_config
from tuneserve.deploy.k8s.provider import KubernetesProvider
from tuneserve.deploy.local import LocalProvider, LocalProvisionRequest
from tuneserve.deploy.scaffold import init_workspace
from tuneserve.deploy.shares import LocalDirTarget
from tuneserve.errors import ProviderError

WIDE = {"COLUMNS": "300"}  # help on one line a flag


def test_the_registry_lists_every_provider_by_its_name() -> None:
    assert registry.PROVIDERS == {
        "local": LocalProvider,
        "azure": AzureProvider,
        "kubernetes": KubernetesProvider,
    }
    assert DEFAULT_PROVIDER in registry.names()
    assert registry.provider_class("local") is LocalProvider
    with pytest.raises(
        ProviderError, match="unknown provider 'k8s'; the providers are: local, azure, kubernetes"
    ):
        registry.provider_class("k8s")


def test_each_provider_owns_its_provision_options() -> None:
    assert [o.name for o in LocalProvisionRequest.options()] == ["port", "share_dir"]
    assert [o.name for o in AzureProvisionRequest.options()] == ["location"]
    assert ProvisionRequest.options() == []
    options = registry.provision_options()
    assert {name: [who for who, _ in takers] for name, takers in options.items()} == {
        "port": ["local"],
        "share_dir": ["local"],
        "location": ["azure"],
        **{
            name: ["kubernetes"]
            for name in (
                "context",
                "namespace",
                "dry_run",
                "gpus",
                "storage_class",
                "service_type",
                "autoscaler",
                "prometheus_url",
                "ingress_host",
                "ingress_tls_secret",
            )
        },
    }
    assert options["port"][0][1].type == int | None
    assert options["dry_run"][0][1].type == bool | None
    assert options["share_dir"][0][1].type == Path | None


def test_the_cli_reads_choices_and_flags_from_the_registry(deploy_app: typer.Typer) -> None:
    text = CliRunner().invoke(deploy_app, ["provision", "--help"], env=WIDE).output
    assert "local|azure|kubernetes" in text and "local: processes on this machine" in text
    assert "kubernetes: the namespace" in text and "--dry-run" in text
    for flag in ("--port", "--share-dir", "--location", "--subscription", "--api-key"):
        assert flag in text
    assert "local: the endpoint's loopback port" in text
    assert "azure: the region for a resource group" in text
    deploy_help = CliRunner().invoke(deploy_app, ["deploy", "--help"], env=WIDE).output
    assert "(default: local 300, azure 1800, kubernetes 1800)" in deploy_help


# --- a provider added by listing it ----------------------------------------------------------


@dataclass
class KubeRequest(ProvisionRequest):
    namespace: str | None = option("the namespace to deploy into.")
    port: int | None = option("the service port.")


class KubeProvider(Provider):
    name = "kube"
    summary = "a Kubernetes cluster"
    request_type = KubeRequest
    default_timeout_s = 600.0
    seen: list[KubeRequest] = []

    def provision(self, request: KubeRequest) -> InferenceConfig:
        self.seen.append(request)
        return InferenceConfig(
            SUBSCRIPTION_ID=request.subscription_id,
            RESOURCE_GROUP_NAME=request.resource_group,
            STORAGE_ACCOUNT_NAME="pvc",
            FILE_SHARE_NAME="models",
            ACA_APP_NAME="inference",
            ACA_APP_ENDPOINT=f"http://inference.{request.namespace}.svc:{request.port}",
            PROVIDER=self.name,
        )

    def roll_out(self, sync_summary: str, *, timeout: float, replicas: int | None) -> DeployResult:
        return DeployResult("kube-r1", self.endpoint, sync_summary)

    def status(self, *, api_key: str | None = None) -> StatusReport:
        return StatusReport(self.name, "inference", self.endpoint, "kube-r1", ready=True)

    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]:
        return iter(["kube log line"])

    def stop(self) -> str:
        return "stopped"

    def share_target(self) -> LocalDirTarget:
        return LocalDirTarget(self.paths.state / "pvc")

    def replica_urls(self) -> list[str]:
        return [self.endpoint]


@pytest.fixture
def kube_app(monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    monkeypatch.setitem(registry.PROVIDERS, "kube", KubeProvider)
    KubeProvider.seen.clear()
    raw = deploy_cli.provision.__wrapped__  # type: ignore[attr-defined]

    @functools.wraps(raw)
    def provision(*args: Any, **kwargs: Any) -> None:
        raw(*args, **kwargs)

    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("provision")(deploy_cli._with_providers(deploy_cli._errors(provision)))
    app.command("status")(deploy_cli.status)
    return app


def test_a_listed_provider_gets_its_choice_flags_and_workflow(
    kube_app: typer.Typer, tmp_path: Path
) -> None:
    runner = CliRunner()
    text = runner.invoke(kube_app, ["provision", "--help"], env=WIDE).output
    assert "local|azure|kubernetes|kube" in text and "kube: a Kubernetes cluster" in text
    # one --port serves both providers that declare it; --namespace is kube's alone
    assert "local: the endpoint's loopback port" in text and "kube: the service port." in text
    assert "--namespace" in text

    ws = tmp_path / "ws"
    init_workspace(ws)
    args = ["provision", "-w", ws, "--provider", "kube", "--namespace", "ml", "--port", "8000"]
    result = runner.invoke(kube_app, [*map(str, args), "--location", "westus3"])
    assert result.exit_code == 0, result.output
    [request] = KubeProvider.seen
    assert (request.namespace, request.port) == ("ml", 8000)
    # no subscription on this platform: its name seeds the derived names
    assert (request.subscription_id, request.resource_group) == ("kube", "kube")
    assert "--location does not apply to the kube provider; ignored" in result.output
    config = load_config(ws / "infra" / "inference.config.json")
    assert config.PROVIDER == "kube" and config.endpoint_url == "http://inference.ml.svc:8000"
    assert json.loads(result.stdout)["PROVIDER"] == "kube"

    status = runner.invoke(kube_app, ["status", "-w", str(ws)])
    assert status.exit_code == 0 and "provider: kube" in status.stdout
