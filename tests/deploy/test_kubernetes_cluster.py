"""The kubernetes provider against a cluster: provision applies server-side (idempotent), deploy
rolls the Deployment and undoes a failed rollout, status, logs and stop; through the CLI and the
official `kubernetes` client, reading a kubeconfig.

The cluster is tests/deploy/kube_standin.py, a loopback stand-in of the API subset used (no
cluster can run here; its docstring says what it checks and emulates). The share sync is the
Azure provider's own path to the Azure Files share (tests/deploy/test_azure_provider.py covers it
against the Azure stand-in); here the provider's share is a local folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import kube_standin
from tests.deploy.kube_standin import REVISION, KubeStandIn
from tuneserve.deploy.infra import load_config
from tuneserve.deploy.k8s.manifests import AZURE_SECRET_FIELDS
from tuneserve.deploy.k8s.provider import KEDA_PAUSED, KubernetesProvider
from tuneserve.deploy.scaffold import init_workspace
from tuneserve.deploy.shares import LocalDirTarget

NS = "ml"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[KubeStandIn]:
    with kube_standin.serve(KubeStandIn()) as standin:
        config = tmp_path / "kubeconfig"
        config.write_text(yaml.safe_dump(kube_standin.kubeconfig(standin.url)))
        monkeypatch.setenv("KUBECONFIG", str(config))
        monkeypatch.setattr(KubernetesProvider, "poll_s", 0.02)
        share = tmp_path / "share"
        monkeypatch.setattr(KubernetesProvider, "share_target", lambda self: LocalDirTarget(share))
        yield standin


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    init_workspace(ws)
    (ws / "models").mkdir(exist_ok=True)
    (ws / "models" / "note.txt").write_text("an adapter would lie here\n")
    return ws


def provision(cli: Callable[..., Any], ws: Path, *extra: str, ok: bool = True) -> Any:
    return cli("provision", "-w", ws, "--provider", "kubernetes", "--namespace", NS, *extra, ok=ok)


def storage_key(cluster: KubeStandIn, ws: Path) -> None:
    """The user's one step after provisioning on Azure Files: the account key's Secret."""
    name, key = AZURE_SECRET_FIELDS
    cluster.add_secret(NS, f"{app_of(ws)}-storage", {name: "acct", key: "secret-key"})


def app_of(ws: Path) -> str:
    return str(load_config(ws / "infra" / "inference.config.json").ACA_APP_NAME)


def test_provision_applies_server_side_and_again_changes_nothing(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    result = provision(cli, workspace)
    app = app_of(workspace)
    kinds = [
        "Namespace",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
    ]
    assert [a.split("/")[0] for a in cluster.applies] == kinds
    assert f"applied Deployment/{app}" in result.output
    config = load_config(workspace / "infra" / "inference.config.json")
    assert config.SUBSCRIPTION_ID == "stand-in"  # the kubeconfig's current context
    deployment = cluster.get("Deployment", app)
    assert deployment is not None and deployment["metadata"]["generation"] == 1
    secret = cluster.get("Secret", f"{app}-keys")
    assert secret is not None and set(secret["data"]) == {"api-key", "admin-key"}
    before = json.dumps({k: v for k, v in cluster.objects.items()}, sort_keys=True)

    provision(cli, workspace)
    assert len(cluster.applies) == 2 * len(kinds)
    assert json.dumps(cluster.objects, sort_keys=True) == before  # nothing changed


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (
            "PersistentVolume",
            "PersistentVolume is cluster-scoped: rights in a namespace do not cover it; the "
            "kubeconfig's user needs a ClusterRole allowing create and patch on persistentvolumes "
            "(or provision with --storage-class NAME: a claim on a class needs no volume)",
        ),
        (
            "Secret",
            "the kubeconfig's user needs the right to create and patch secrets in this namespace",
        ),
    ],
)
def test_a_write_rbac_refuses_says_which_rights_are_missing(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn, kind: str, words: str
) -> None:
    """A namespace admin cannot write a PersistentVolume (cluster-scoped): the 403 is the API
    server's, and provision adds what it means and the way around it."""
    cluster.forbidden = {kind}
    result = provision(cli, workspace, ok=False)
    assert "is forbidden" in result.output and "cannot patch resource" in result.output
    assert words in " ".join(result.output.split())  # the message may be wrapped


def test_without_keda_the_autoscaler_is_a_plain_hpa_on_the_same_gauge(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    """KEDA is looked for by API discovery (GET /apis/keda.sh/v1alpha1); where it is absent and
    --autoscaler does not say, the HPA takes its place, and a missing custom metrics API (what
    the HPA reads the gauge through) is warned of."""
    cluster.keda = False
    result = provision(cli, workspace)
    app = app_of(workspace)
    assert "The cluster has no KEDA" in result.output
    assert "HorizontalPodAutoscaler on tuneserve_requests_waiting" in result.output
    assert "custom.metrics.k8s.io/v1beta1" in result.output  # not served here
    assert not cluster.find("ScaledObject")
    hpa = cluster.get("HorizontalPodAutoscaler", app)
    assert hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == app
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "tuneserve_requests_waiting"
    folder = workspace / "infra" / "kubernetes"
    rendered = yaml.safe_load((folder / "60-autoscaler.yaml").read_text())
    assert rendered["kind"] == "HorizontalPodAutoscaler"  # the files say what was applied

    cluster.custom_metrics = True  # prometheus-adapter installed: no warning
    again = provision(cli, workspace)
    assert "custom.metrics.k8s.io" not in again.output


def test_keda_asked_for_on_a_cluster_without_it_applies_the_rest_and_says_so(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    cluster.keda = False
    result = provision(cli, workspace, "--autoscaler", "keda")
    assert "the cluster has no KEDA" in result.output and "--autoscaler hpa" in result.output
    assert cluster.get("Deployment", app_of(workspace)) is not None
    assert not cluster.find("ScaledObject") and not cluster.find("HorizontalPodAutoscaler")


def test_deploy_rolls_a_new_revision_and_a_failed_one_is_undone(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    provision(cli, workspace)
    storage_key(cluster, workspace)
    app = app_of(workspace)
    first = cli("deploy", "-w", workspace)
    assert f"Deployed revision {app}--r1" in first.output
    assert first.stdout.strip().splitlines()[-1] == (f"http://{app}.{NS}.svc.cluster.local:7860")
    serving = cluster.pods()
    assert [p["metadata"]["annotations"][REVISION] for p in serving] == [f"{app}--r1"]

    cluster.crashing.add(f"{app}--r2")
    cluster.ready_counts.clear()
    failed = cli("deploy", "-w", workspace, ok=False)
    # at every step of the failed rollout and its undo a ready pod was there to serve (the
    # stand-in removes old pods early unless the rendered strategy says maxUnavailable 0)
    assert cluster.ready_counts[app] and min(cluster.ready_counts[app]) >= 1
    assert f"revision {app}--r2 did not become ready" in failed.output
    assert "CrashLoopBackOff" in failed.output
    assert "ModelLoadError: boom" in failed.output  # the failing pod's log tail
    assert f"The previous revision {app}--r1 is still serving" in failed.output
    # the template is r1's again, and r1's pods were never replaced
    deployment = cluster.get("Deployment", app)
    assert deployment is not None
    assert deployment["spec"]["template"]["metadata"]["annotations"][REVISION] == f"{app}--r1"
    assert cluster.pods() == serving

    cluster.crashing.clear()
    again = cli("deploy", "-w", workspace)
    assert f"Deployed revision {app}--r2" in again.output
    assert [p["metadata"]["annotations"][REVISION] for p in cluster.pods()] == [f"{app}--r2"]


def test_a_deploy_without_the_storage_key_secret_is_refused_at_once(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    """The Azure Files volume mounts with the account key's Secret, which the user creates (the
    key is Azure's): without it the pods would wait to mount until the deploy timed out, so the
    deploy stops before changing anything and says how to make it; provision says whether it
    is there."""
    result = provision(cli, workspace)
    app = app_of(workspace)
    assert f"create secret generic {app}-storage" in result.output
    before = json.dumps(cluster.objects, sort_keys=True)
    refused = cli("deploy", "-w", workspace, ok=False)
    words = " ".join(refused.output.split())
    assert f"mounts with Secret '{app}-storage', which is not in namespace '{NS}'" in words
    assert f"-n {NS} create secret generic {app}-storage" in words
    assert "Syncing" not in words  # refused before the sync
    assert "--from-literal=azurestorageaccountkey=" in words
    assert json.dumps(cluster.objects, sort_keys=True) == before  # nothing was changed

    storage_key(cluster, workspace)
    again = provision(cli, workspace)
    assert f"mounts with Secret {app}-storage (present)" in again.output
    assert "create secret generic" not in again.output
    cli("deploy", "-w", workspace)


def test_a_user_who_may_not_read_secrets_still_provisions_and_deploys(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    """Reading Secrets is often refused to deployers (the kubelet mounts them, not the user):
    whether the key's Secret is there cannot be told then, so neither step stops for it."""
    cluster.unreadable = {"Secret"}
    result = provision(cli, workspace)
    assert "create secret generic" in result.output  # the one-time step, said as always
    storage_key(cluster, workspace)
    cli("deploy", "-w", workspace)


def test_the_stand_in_removes_old_pods_early_unless_the_strategy_keeps_them(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    """The check above is live: with maxUnavailable 1 the failed rollout leaves no pod ready
    for a while (the stand-in does what a controller may do then)."""
    from tuneserve.deploy.k8s.provider import kube_api

    provision(cli, workspace)
    storage_key(cluster, workspace)
    app = app_of(workspace)
    cli("deploy", "-w", workspace)
    api = kube_api("stand-in", NS)
    loose = {"spec": {"strategy": {"rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}}}
    api.merge_patch("Deployment", app, loose)
    cluster.crashing.add(f"{app}--r2")
    cluster.ready_counts.clear()
    cli("deploy", "-w", workspace, ok=False)
    assert min(cluster.ready_counts[app]) == 0


def test_status_logs_and_stop(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    provision(cli, workspace)
    storage_key(cluster, workspace)
    app = app_of(workspace)
    cli("deploy", "-w", workspace)

    status = cli("status", "-w", workspace)
    assert f"revision: {app}--r1" in status.stdout and "ready: yes" in status.stdout
    assert "replicas: 1" in status.stdout
    assert "port-forward" in status.output

    [pod] = cluster.pods()
    logs = cli("logs", "-w", workspace, "--tail", "1")
    assert logs.stdout.splitlines() == [f"[{pod['metadata']['name']}] serving {app}--r1"]

    stopped = cli("stop", "-w", workspace)
    assert f"Stopped {app}" in stopped.stdout
    deployment = cluster.get("Deployment", app)
    scaler = cluster.get("ScaledObject", app)
    assert deployment is not None and deployment["spec"]["replicas"] == 0
    assert scaler is not None and scaler["metadata"]["annotations"][KEDA_PAUSED] == "0"
    assert cluster.pods() == []

    # deploy starts it again: one replica, KEDA resumed
    cli("deploy", "-w", workspace)
    scaler = cluster.get("ScaledObject", app)
    assert scaler is not None and KEDA_PAUSED not in (scaler["metadata"].get("annotations") or {})
    assert [p["metadata"]["annotations"][REVISION] for p in cluster.pods()] == [f"{app}--r2"]


def test_a_failed_first_deploy_leaves_the_provisioned_pods_serving(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    provision(cli, workspace)
    storage_key(cluster, workspace)
    app = app_of(workspace)
    provisioned = cluster.pods()
    assert len(provisioned) == 1 and REVISION not in provisioned[0]["metadata"]["annotations"]
    cluster.crashing.add(f"{app}--r1")
    failed = cli("deploy", "-w", workspace, ok=False)
    assert f"The previous revision {app} (as provisioned) is still serving" in failed.output
    deployment = cluster.get("Deployment", app)
    assert deployment is not None
    assert REVISION not in deployment["spec"]["template"]["metadata"]["annotations"]
    assert cluster.pods() == provisioned


def test_a_service_monitor_is_applied_only_where_the_operators_crd_exists(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    result = provision(cli, workspace, "--ingress-host", "chat.example.com")
    assert "No ServiceMonitor: the cluster has no servicemonitors.monitoring.coreos.com" in (
        result.output
    )
    app = app_of(workspace)
    assert cluster.get("Ingress", app) is not None
    assert not cluster.find("ServiceMonitor")

    cluster.prometheus_operator = True
    again = provision(cli, workspace, "--ingress-host", "chat.example.com")
    assert f"applied ServiceMonitor/{app}" in again.output
    monitor = cluster.get("ServiceMonitor", app)
    assert monitor is not None and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
