"""The kubernetes provider's rendering: `tuneserve provision --provider kubernetes --dry-run`
writes infra/kubernetes/, every object of which passes kubernetes-validate's strict schemas for a
named Kubernetes version (offline: the package bundles them), and the Deployment carries what a
lossless rollout needs. KEDA's ScaledObject and the Prometheus operator's ServiceMonitor are
custom resources the bundled schemas lack: they are validated against their CRDs' published
openAPIV3Schema (kept in crds/), every field of them declared there."""

from __future__ import annotations

import functools
import json
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tuneserve.deploy.infra import TARGET_PORT, InfraPaths, load_config
from tuneserve.deploy.k8s import manifests as m
from tuneserve.deploy.k8s import render
from tuneserve.deploy.keys import EndpointKeys, load_keys
from tuneserve.deploy.scaffold import init_workspace

K8S_VERSION = "1.30"
KEYS = EndpointKeys(api_key="ts-api", admin_key="ts-admin")


def validate_all(objects: list[dict[str, Any]]) -> list[str]:
    """Validate each object strictly; returns the kinds without a bundled schema."""
    unchecked = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(obj["kind"])
    return unchecked


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def spec(**changes: Any) -> m.KubeSpec:
    base: dict[str, Any] = dict(
        app="chat",
        namespace="ml",
        commands=["cd /mount", "exec tuneserve serve --workspace /mount --port 7860"],
        storage=m.AzureFilesShare("acct", "share", "ft-rg", "chat-storage"),
    )
    return m.KubeSpec(**{**base, **changes})


def rendered(s: m.KubeSpec) -> list[dict[str, Any]]:
    return [obj for objs in render.render(s, KEYS).values() for obj in objs]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="azure-files-keda"),
        pytest.param({"storage": m.ClassShare("nfs-rwx"), "gpus": 0}, id="class-cpu-only"),
        pytest.param({"service_type": "LoadBalancer", "autoscaler": "hpa"}, id="lb-hpa"),
        pytest.param({"namespace": "default", "max_replicas": 1}, id="default-ns-one-replica"),
        pytest.param({"gpus": 4, "autoscaler": "none"}, id="four-gpus-no-autoscaler"),
    ],
)
def test_every_rendered_object_validates_strictly(changes: dict[str, Any]) -> None:
    objects = rendered(spec(**changes))
    unchecked = validate_all(objects)
    assert unchecked == (
        ["ScaledObject"]
        if spec(**changes).autoscaled and spec(**changes).autoscaler == "keda"
        else []
    )


def test_the_deployment_rolls_without_losing_a_request() -> None:
    s = spec(commands=["exec tuneserve serve --workspace /mount --shutdown-timeout 120"])
    deploy = m.deployment(s)
    pod = deploy["spec"]["template"]["spec"]
    [box] = pod["containers"]
    # a new pod is ready before an old one goes
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    # the kubelet waits out the pre-stop pause, the server's drain and its exit
    assert pod["terminationGracePeriodSeconds"] == m.PRE_STOP_SLEEP_S + 120 + m.EXIT_MARGIN_S
    assert box["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(m.PRE_STOP_SLEEP_S)]
    # readiness and the startup budget on /ready, liveness on /health, all on the served port
    assert box["ports"] == [{"name": "http", "containerPort": TARGET_PORT, "protocol": "TCP"}]
    probes = {k: box[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: p["httpGet"] for k, p in probes.items()} == {
        "startupProbe": {"path": "/ready", "port": "http"},
        "readinessProbe": {"path": "/ready", "port": "http"},
        "livenessProbe": {"path": "/health", "port": "http"},
    }
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= m.DEFAULT_STARTUP_BUDGET_S
    # the rollout is declared failed only after the pods had their whole load budget
    assert deploy["spec"]["progressDeadlineSeconds"] > m.DEFAULT_STARTUP_BUDGET_S
    # the GPU, the share at /mount, /dev/shm in memory
    assert box["resources"]["limits"] == {"nvidia.com/gpu": 1}
    mounts = {v["mountPath"]: v["name"] for v in box["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/mount"]]["persistentVolumeClaim"] == {"claimName": "chat-share"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert box["command"][:2] == ["/bin/bash", "-c"]
    # an autoscaler owns the replica count
    assert "replicas" not in deploy["spec"]


def test_the_keys_come_from_the_rendered_secret() -> None:
    objects = by_kind(rendered(spec()))
    secret = objects["Secret"]
    [box] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in box["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == {"TUNESERVE_API_KEY", "TUNESERVE_ADMIN_KEY"}
    assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
    values = {name: secret["stringData"][r["key"]] for name, r in refs.items()}
    assert values == {"TUNESERVE_API_KEY": "ts-api", "TUNESERVE_ADMIN_KEY": "ts-admin"}


def test_cpu_only_requests_no_gpu_and_tolerates_no_gpu_taint() -> None:
    pod = m.deployment(spec(gpus=0))["spec"]["template"]["spec"]
    assert "limits" not in pod["containers"][0]["resources"]
    assert "tolerations" not in pod


def test_the_share_is_a_static_azure_files_volume_bound_to_its_claim() -> None:
    volume, claim = m.storage(spec())
    assert volume["spec"]["csi"]["driver"] == "file.csi.azure.com"
    assert volume["spec"]["csi"]["volumeAttributes"] == {
        "storageAccount": "acct",
        "shareName": "share",
        "resourceGroup": "ft-rg",
    }
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert volume["spec"]["claimRef"] == {"namespace": "ml", "name": claim["metadata"]["name"]}
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert claim["spec"]["storageClassName"] == "" == volume["spec"]["storageClassName"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    [by_class] = m.storage(spec(storage=m.ClassShare("nfs-rwx")))
    assert by_class["spec"]["storageClassName"] == "nfs-rwx"
    assert by_class["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_autoscaler_scales_on_queued_requests() -> None:
    keda = m.autoscaler(spec(max_replicas=3))
    assert keda is not None and keda["kind"] == "ScaledObject"
    assert keda["spec"]["scaleTargetRef"] == {"name": "chat"}
    assert (keda["spec"]["minReplicaCount"], keda["spec"]["maxReplicaCount"]) == (1, 3)
    [trigger] = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == (
        'sum(tuneserve_requests_waiting{namespace="ml",pod=~"chat-[^-]+-[^-]+"})'
    )
    assert trigger["metadata"]["threshold"] == str(m.DEFAULT_TARGET_WAITING)
    hpa = m.autoscaler(spec(max_replicas=3, autoscaler="hpa"))
    assert hpa is not None and hpa["spec"]["maxReplicas"] == 3
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "tuneserve_requests_waiting"
    # one replica at most: nothing to scale, the Deployment holds the count
    assert m.autoscaler(spec(max_replicas=1)) is None
    assert m.deployment(spec(max_replicas=1))["spec"]["replicas"] == 1


# --- through the CLI -------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    init_workspace(ws)
    (ws / "infra" / "finetuning.config.json").write_text(
        json.dumps(
            {
                "SUBSCRIPTION_ID": "sub-1",
                "RESOURCE_GROUP_NAME": "ft-rg",
                "STORAGE_ACCOUNT_NAME": "ftstorage",
                "FILE_SHARE_NAME": "ftshare",
            }
        )
    )
    return ws


def test_provision_dry_run_renders_the_folder(
    cli: Callable[..., Any], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(workspace / "no-such-kubeconfig"))
    result = cli(
        "provision",
        "-w",
        workspace,
        "--provider",
        "kubernetes",
        "--namespace",
        "ml",
        "--context",
        "aks-1",
        "--dry-run",
    )
    assert "Dry run: no cluster reached" in result.output
    folder = workspace / "infra" / "kubernetes"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert names == [
        "00-namespace.yaml",
        "10-storage.yaml",
        "20-secret.yaml",
        "30-deployment.yaml",
        "40-service.yaml",
        "50-disruption-budget.yaml",
        "60-autoscaler.yaml",
    ]
    # the keys: shown once, kept 0600 in the Secret's file, which git ignores
    secret_file = folder / render.SECRET_FILE
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert render.SECRET_FILE in (folder / ".gitignore").read_text().splitlines()
    keys = load_keys(InfraPaths(workspace))
    assert keys is not None and keys.api_key in result.output
    objects = render.read(folder)
    assert validate_all(objects) == ["ScaledObject"]
    kinds = by_kind(objects)
    assert kinds["Secret"]["stringData"][m.API_KEY_FIELD] == keys.api_key
    # the fine-tuning step's share, where it lies
    attrs = kinds["PersistentVolume"]["spec"]["csi"]["volumeAttributes"]
    assert attrs == {
        "storageAccount": "ftstorage",
        "shareName": "ftshare",
        "resourceGroup": "ft-rg",
    }
    assert "create secret generic" in result.output
    # the six keys with this provider's meaning
    config = load_config(workspace / "infra" / "inference.config.json")
    app = kinds["Deployment"]["metadata"]["name"]
    assert config.model_dump() == {
        "SUBSCRIPTION_ID": "aks-1",
        "RESOURCE_GROUP_NAME": "ml",
        "STORAGE_ACCOUNT_NAME": "ftstorage",
        "FILE_SHARE_NAME": "ftshare",
        "ACA_APP_NAME": app,
        "ACA_APP_ENDPOINT": f"http://{app}.ml.svc.cluster.local:7860",
        "PROVIDER": "kubernetes",
    }


def test_provision_again_updates_and_drops_what_is_no_longer_rendered(
    cli: Callable[..., Any], workspace: Path
) -> None:
    args = ["provision", "-w", workspace, "--provider", "kubernetes", "--dry-run"]
    cli(*args)
    folder = workspace / "infra" / "kubernetes"
    first_secret = (folder / render.SECRET_FILE).read_text()
    result = cli(*args, "--autoscaler", "none", "--storage-class", "nfs-rwx", "--gpus", "0")
    assert not (folder / "60-autoscaler.yaml").exists()
    assert not (folder / "00-namespace.yaml").exists()  # "default" is not created
    assert (folder / render.SECRET_FILE).read_text() == first_secret  # the same keys
    assert "API key" not in result.output  # not shown again
    kinds = by_kind(render.read(folder))
    assert "PersistentVolume" not in kinds
    assert kinds["PersistentVolumeClaim"]["spec"]["storageClassName"] == "nfs-rwx"
    config = load_config(workspace / "infra" / "inference.config.json")
    assert config.STORAGE_ACCOUNT_NAME == "nfs-rwx"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        pytest.param(
            "--service-type", "NodePort", "accepted are ClusterIP, LoadBalancer", id="svc"
        ),
        pytest.param("--autoscaler", "vpa", "accepted are keda, hpa, none", id="scaler"),
        pytest.param("--namespace", "ML_team", "a namespace is lowercase", id="namespace"),
        pytest.param("--gpus", "-1", "give 0 (CPU only) or more", id="gpus"),
    ],
)
def test_provision_refuses_a_bad_flag_by_name(
    cli: Callable[..., Any], workspace: Path, flag: str, value: str, message: str
) -> None:
    result = cli(
        "provision",
        "-w",
        workspace,
        "--provider",
        "kubernetes",
        "--dry-run",
        f"{flag}={value}",
        ok=False,
    )
    assert message in result.output


def test_deploy_to_a_storage_class_volume_without_a_cluster_names_the_context(
    cli: Callable[..., Any], workspace: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sync pod needs the cluster (test_kubernetes_podshare.py syncs through it)."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    cli(
        "provision",
        "-w",
        workspace,
        "--provider",
        "kubernetes",
        "--dry-run",
        "--context",
        "c1",
        "--storage-class",
        "nfs-rwx",
    )
    result = cli("deploy", "-w", workspace, ok=False)
    assert "cannot use context 'c1' of the kubeconfig" in result.output


def test_the_schema_check_is_live() -> None:
    """A misspelt field fails: the strict schemas are really applied."""
    service = m.service(spec())
    service["spec"]["selectors"] = service["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError, match="selectors"):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


def test_the_ingress_routes_the_host_to_the_service_and_validates() -> None:
    s = spec(ingress_host="chat.example.com", ingress_tls_secret="chat-tls")
    objects = rendered(s)
    assert validate_all(objects) == ["ScaledObject"]  # the Ingress passes the strict schema
    ingress = by_kind(objects)["Ingress"]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "chat.example.com"
    [route] = rule["http"]["paths"]
    assert route["backend"]["service"] == {"name": "chat", "port": {"name": "http"}}
    assert m.service(s)["spec"]["ports"][0]["name"] == "http"
    assert ingress["spec"]["tls"] == [{"hosts": ["chat.example.com"], "secretName": "chat-tls"}]
    # streams are not cut at ingress-nginx's 60 s nor buffered
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    )
    assert "tls" not in (m.ingress(spec(ingress_host="chat.example.com")) or {})["spec"]
    assert m.ingress(spec()) is None


def test_the_service_monitor_scrapes_the_services_pods() -> None:
    """A custom resource (no bundled schema; its CRD's schema is applied below): what it
    selects and scrapes checked against the Service."""
    s = spec(service_monitor=True)
    objects = rendered(s)
    assert sorted(validate_all(objects)) == ["ScaledObject", "ServiceMonitor"]
    monitor = by_kind(objects)["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    service = by_kind(objects)["Service"]
    # it selects the Service by its labels, and names the Service's port
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    assert m.service_monitor(spec()) is None


# --- the custom resources against their CRDs' schemas ---------------------------------------

CRDS = Path(__file__).parent / "crds"
CRD_SCHEMAS = {  # kind: the served version's openAPIV3Schema (source and license in each file)
    "ScaledObject": CRDS / "keda.sh_scaledobjects.v1alpha1.yaml",
    "ServiceMonitor": CRDS / "monitoring.coreos.com_servicemonitors.v1.yaml",
}


def undeclared(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """The paths of fields the structural schema does not declare: the API server prunes them
    without a word, so a misspelt optional field would be lost rather than refused."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list) and "items" in schema:
        items = schema["items"]
        return [p for i, v in enumerate(value) for p in undeclared(v, items, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    found = []
    for key, v in value.items():
        sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
        if isinstance(sub, dict):
            found += undeclared(v, sub, f"{path}.{key}")
        elif sub is not True:
            found.append(f"{path}.{key}")
    return found


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = yaml.safe_load(CRD_SCHEMAS[kind].read_text(encoding="utf-8"))
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI 3.0 schemas are draft-4 style
    return schema


def crd_problems(obj: dict[str, Any]) -> list[str]:
    """What the CRD's schema refuses or does not declare in `obj` (the CEL rules of
    x-kubernetes-validations are not evaluated; metadata is ObjectMeta, checked strictly)."""
    schema = crd_schema(obj["kind"])
    errors = jsonschema.Draft4Validator(schema).iter_errors(obj)
    problems = [f"{e.json_path}: {e.message}" for e in errors]
    problems += [f"undeclared {p}" for p in undeclared({**obj, "metadata": {}}, schema, "$")]
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    try:
        kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"$.metadata: {e.message}")
    return problems


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_the_custom_resources_validate_against_their_crds(tmp_path: Path, kind: str) -> None:
    """As written to infra/kubernetes/ (the YAML kubectl applies), with KEDA and a monitor."""
    render.write(tmp_path, render.render(spec(service_monitor=True), KEYS))
    assert crd_problems(by_kind(render.read(tmp_path))[kind]) == []


def _rename(node: dict[str, Any], old: str, new: str) -> None:
    node[new] = node.pop(old)


@pytest.mark.parametrize(
    ("kind", "spoil", "problem"),
    [
        pytest.param(  # jsonschema alone passes this one: only the walk sees it
            "ScaledObject",
            lambda o: _rename(o["spec"], "minReplicaCount", "minReplicas"),
            "undeclared $.spec.minReplicas",
            id="optional-field-typo",
        ),
        pytest.param(
            "ScaledObject",
            lambda o: _rename(o["spec"]["triggers"][0], "metadata", "metdata"),
            "$.spec.triggers[0]: 'metadata' is a required property",
            id="trigger-field-typo",
        ),
        pytest.param(
            "ServiceMonitor",
            lambda o: _rename(o["metadata"], "labels", "label"),
            "$.metadata: Additional properties are not allowed ('label' was unexpected)",
            id="metadata-typo",
        ),
        pytest.param(
            "ServiceMonitor",
            lambda o: o["spec"]["endpoints"][0].update(interval=15),
            "$.spec.endpoints[0].interval: 15 is not of type 'string'",
            id="wrong-type",
        ),
    ],
)
def test_the_crd_check_is_live(
    kind: str, spoil: Callable[[dict[str, Any]], None], problem: str
) -> None:
    obj = by_kind(rendered(spec(service_monitor=True)))[kind]
    assert crd_problems(obj) == []
    spoil(obj)
    assert problem in crd_problems(obj)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--ingress-host", "https://x.io"], "give a DNS name", id="scheme"),
        pytest.param(["--ingress-tls-secret", "t"], "needs --ingress-host", id="tls-alone"),
    ],
)
def test_ingress_flags_are_checked(
    cli: Callable[..., Any], workspace: Path, args: list[str], message: str
) -> None:
    result = cli(
        "provision", "-w", workspace, "--provider", "kubernetes", "--dry-run", *args, ok=False
    )
    assert message in result.output


def test_with_an_ingress_host_the_endpoint_is_the_host(
    cli: Callable[..., Any], workspace: Path
) -> None:
    cli(
        "provision",
        "-w",
        workspace,
        "--provider",
        "kubernetes",
        "--dry-run",
        "--ingress-host",
        "chat.example.com",
        "--ingress-tls-secret",
        "chat-tls",
    )
    config = load_config(workspace / "infra" / "inference.config.json")
    assert config.ACA_APP_ENDPOINT == "https://chat.example.com"
    assert (workspace / "infra" / "kubernetes" / "45-ingress.yaml").exists()
    assert not (workspace / "infra" / "kubernetes" / "70-service-monitor.yaml").exists()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(
            {
                "ingress_host": "chat.example.com",
                "ingress_tls_secret": "t",
                "service_monitor": True,
            },
            id="azure-files-keda-ingress-monitor",
        ),
        pytest.param(
            {"storage": m.ClassShare("nfs-rwx"), "gpus": 0, "autoscaler": "hpa"},
            id="class-cpu-hpa",
        ),
    ],
)
def test_the_rendered_files_pass_the_kubernetes_validate_command(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    """`kubernetes-validate --strict -k 1.30` itself (the command, on the files as written),
    as a user or CI would run it on infra/kubernetes/: every object passes, and the only ones it
    cannot check are the custom resources, which it names."""
    s = spec(**changes)
    files = render.write(tmp_path / "kubernetes", render.render(s, KEYS))
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    objects = render.read(tmp_path / "kubernetes")
    custom = {"ScaledObject", "ServiceMonitor"}
    passed = re.findall(r"^INFO .* passed for resource (\S+) against version", done.stdout, re.M)
    assert len(passed) == len([o for o in objects if o["kind"] not in custom])
    warned = re.findall(r"^WARN .*", done.stdout, re.M)
    assert len(warned) == len([o for o in objects if o["kind"] in custom])
    assert all(any(k.lower() in w.lower() for k in custom) for w in warned), warned
    assert "ERROR" not in done.stdout


def test_deploy_syncs_the_static_volumes_azure_files_share_as_the_azure_provider_does(
    cli: Callable[..., Any], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The share the rendered PersistentVolume mounts (the fine-tuning step's account and share)
    is the one deploy syncs, through the Azure provider's own share client (tested against the
    Azure stand-in in test_azure_provider.py); nothing is sent here, the client is lazy."""
    from tuneserve.deploy.azure import AzureFileShareTarget
    from tuneserve.deploy.k8s.provider import KubernetesProvider

    cli("provision", "-w", workspace, "--provider", "kubernetes", "--dry-run")
    monkeypatch.setenv("AZURE_STORAGE_KEY", "c3RhbmQtaW4=")
    paths = InfraPaths(workspace)
    target = KubernetesProvider(paths, load_config(paths.config)).share_target()
    assert isinstance(target, AzureFileShareTarget)
    volume = by_kind(render.read(workspace / "infra" / "kubernetes"))["PersistentVolume"]
    attrs = volume["spec"]["csi"]["volumeAttributes"]
    assert target.describe() == f"{attrs['storageAccount']}/{attrs['shareName']}"
    assert target.share.url == "https://ftstorage.file.core.windows.net/ftshare"
