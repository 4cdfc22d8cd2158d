"""The Kubernetes objects of one inference app, as plain dicts (what `yaml.safe_dump` writes and
what the API takes): pure functions of a `KubeSpec`, so rendering needs no cluster and no client.

The numbers that matter for a lossless rollout live here, each with its reason:
startup probes wait out a slow model load, readiness leaves the Service as soon as a pod drains,
the grace period covers the server's drain, and a rollout never removes a ready pod first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tuneserve.deploy.infra import CONTAINER_IMAGE, MOUNT, SHUTDOWN_TIMEOUT_S, TARGET_PORT
from tuneserve.deploy.keys import ADMIN_KEY_ENV, API_KEY_ENV

Obj = dict[str, Any]

# A pod-template annotation carries the deployed revision: changing it is what rolls the
# Deployment, and the container reads it back (downward API) as TUNESERVE_REVISION for /health.
REVISION_ANNOTATION = "tuneserve.dev/revision"
API_KEY_FIELD = "api-key"
ADMIN_KEY_FIELD = "admin-key"
# what the Azure Files CSI driver reads from a static volume's node-stage secret
AZURE_SECRET_FIELDS = ("azurestorageaccountname", "azurestorageaccountkey")

# Load balancers and kube-proxy learn of a terminating pod a few seconds after the kubelet sends
# SIGTERM; the pod keeps accepting connections that long before the server starts draining.
PRE_STOP_SLEEP_S = 5
# The seconds a drained server takes to exit (uvicorn's shutdown, the engine's stop).
EXIT_MARGIN_S = 10
# A first start installs the build from the share and loads the model from Azure Files: minutes.
DEFAULT_STARTUP_BUDGET_S = 1800
STARTUP_PERIOD_S = 10
# Default for an RWX volume from a storage class (the Azure Files share's size is the share's).
DEFAULT_CLASS_SIZE = "100Gi"
AZURE_FILES_CAPACITY = "1024Gi"  # the template's share quota
# Waiting requests per replica the autoscaler aims at: one more batch's worth queued is when a
# replica is worth adding (a GPU replica takes minutes to start; scaling on 1 would flap).
DEFAULT_TARGET_WAITING = 4
DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
# Scale down slowly: a replica costs minutes of model load to bring back.
SCALE_DOWN_WINDOW_S = 600

SERVICE_TYPES = ("ClusterIP", "LoadBalancer")
AUTOSCALERS = ("keda", "hpa", "none")

_SHUTDOWN_FLAG = re.compile(r"--shutdown-timeout(?:=|\s+)(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class AzureFilesShare:
    """A static PersistentVolume on an existing Azure Files share (the fine-tuning step's)."""

    account: str
    share: str
    resource_group: str | None  # the account's, where it is not the cluster nodes' group
    secret: str  # a Secret holding AZURE_SECRET_FIELDS, which the user creates

    @classmethod
    def of_volume(cls, volume: Obj) -> AzureFilesShare | None:
        """The share a rendered PersistentVolume mounts (None: not an Azure Files volume)."""
        csi = volume.get("spec", {}).get("csi", {})
        if csi.get("driver") != "file.csi.azure.com":
            return None
        attributes = csi.get("volumeAttributes", {})
        return cls(
            attributes["storageAccount"],
            attributes["shareName"],
            attributes.get("resourceGroup"),
            csi["nodeStageSecretRef"]["name"],
        )


@dataclass(frozen=True)
class ClassShare:
    """A ReadWriteMany volume provisioned by a storage class (NFS, CephFS, azurefile-csi...)."""

    storage_class: str
    size: str = DEFAULT_CLASS_SIZE


@dataclass(frozen=True)
class KubeSpec:
    app: str
    namespace: str
    commands: list[str]
    storage: AzureFilesShare | ClassShare
    max_replicas: int = 2
    gpus: int = 1
    image: str = CONTAINER_IMAGE
    service_type: str = "ClusterIP"
    autoscaler: str = "keda"
    prometheus_url: str = DEFAULT_PROMETHEUS
    target_waiting: int = DEFAULT_TARGET_WAITING
    startup_budget_s: int = DEFAULT_STARTUP_BUDGET_S
    extra_labels: dict[str, str] = field(default_factory=dict)
    ingress_host: str | None = None
    ingress_tls_secret: str | None = None  # a kubernetes.io/tls Secret for ingress_host
    service_monitor: bool = False  # the cluster has the Prometheus operator's CRD

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "tuneserve", "app.kubernetes.io/instance": self.app}

    @property
    def keys_secret(self) -> str:
        return f"{self.app}-keys"

    @property
    def claim(self) -> str:
        return f"{self.app}-share"

    @property
    def volume(self) -> str:
        # PersistentVolumes are cluster-wide: the namespace keeps two apps' names apart
        return f"{self.namespace}-{self.app}-share"

    @property
    def shutdown_timeout_s(self) -> float:
        """`tuneserve serve --shutdown-timeout` as the commands set it, else its default."""
        found = _SHUTDOWN_FLAG.findall("; ".join(self.commands))
        return float(found[-1]) if found else float(SHUTDOWN_TIMEOUT_S)

    @property
    def grace_period_s(self) -> int:
        return PRE_STOP_SLEEP_S + math.ceil(self.shutdown_timeout_s) + EXIT_MARGIN_S

    @property
    def autoscaled(self) -> bool:
        return self.autoscaler != "none" and self.max_replicas > 1

    def meta(self, name: str, *, namespaced: bool = True) -> Obj:
        meta: Obj = {"name": name}
        if namespaced:
            meta["namespace"] = self.namespace
        meta["labels"] = {**self.labels, "app.kubernetes.io/managed-by": "tuneserve"}
        return meta


def namespace(spec: KubeSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": spec.meta(spec.namespace, namespaced=False),
    }


def keys_secret(spec: KubeSpec, api_key: str, admin_key: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": spec.meta(spec.keys_secret),
        "type": "Opaque",
        "stringData": {API_KEY_FIELD: api_key, ADMIN_KEY_FIELD: admin_key},
    }


def storage(spec: KubeSpec) -> list[Obj]:
    """The share as a ReadWriteMany claim: bound to a static Azure Files volume, or provisioned
    by the storage class."""
    claim: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": spec.meta(spec.claim),
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {}}},
    }
    share = spec.storage
    if isinstance(share, ClassShare):
        claim["spec"]["storageClassName"] = share.storage_class
        claim["spec"]["resources"]["requests"]["storage"] = share.size
        return [claim]
    # "" opts out of dynamic provisioning: the claim binds only to the volume it names
    claim["spec"].update(storageClassName="", volumeName=spec.volume)
    claim["spec"]["resources"]["requests"]["storage"] = AZURE_FILES_CAPACITY
    attributes = {"storageAccount": share.account, "shareName": share.share}
    if share.resource_group:
        attributes["resourceGroup"] = share.resource_group
    volume_meta = spec.meta(spec.volume, namespaced=False)
    volume_meta["annotations"] = {"pv.kubernetes.io/provisioned-by": "file.csi.azure.com"}
    volume: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": volume_meta,
        "spec": {
            "capacity": {"storage": AZURE_FILES_CAPACITY},
            "accessModes": ["ReadWriteMany"],
            # the share holds the fine-tuning step's adapters: deleting the claim must not touch it
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": spec.namespace, "name": spec.claim},
            # mfsymlinks: the share keeps symlinks; nobrl: SQLite-style byte-range locks are
            # refused by SMB and some model loaders take them
            "mountOptions": [
                "dir_mode=0777",
                "file_mode=0777",
                "mfsymlinks",
                "nobrl",
                "cache=strict",
            ],
            "csi": {
                "driver": "file.csi.azure.com",
                # unique per share in the cluster, as the driver requires
                "volumeHandle": "#".join([share.resource_group or "", share.account, share.share]),
                "volumeAttributes": attributes,
                "nodeStageSecretRef": {"name": share.secret, "namespace": spec.namespace},
            },
        },
    }
    return [volume, claim]


def _key_env(name: str, field_name: str, secret: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": field_name}}}


def _probe(path: str, *, period: int, failures: int, timeout: int) -> Obj:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def container(spec: KubeSpec) -> Obj:
    resources: Obj = {"requests": {"cpu": "1", "memory": "4Gi"}}
    if spec.gpus:
        # extended resources are requested through limits (requests default to them)
        resources["limits"] = {"nvidia.com/gpu": spec.gpus}
    revision_ref = f"metadata.annotations['{REVISION_ANNOTATION}']"
    return {
        "name": "tuneserve",
        "image": spec.image,
        # the parameters file's defaultCommands, run as the Container Apps template runs them
        "command": ["/bin/bash", "-c", "; ".join(spec.commands)],
        "ports": [{"name": "http", "containerPort": TARGET_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "TUNESERVE_REVISION", "valueFrom": {"fieldRef": {"fieldPath": revision_ref}}},
            {"name": "TUNESERVE_MOUNT", "value": MOUNT},
            {"name": "GRADIO_ANALYTICS_ENABLED", "value": "False"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            _key_env(API_KEY_ENV, API_KEY_FIELD, spec.keys_secret),
            _key_env(ADMIN_KEY_ENV, ADMIN_KEY_FIELD, spec.keys_secret),
        ],
        "resources": resources,
        # /ready is 200 once the model is loaded: the startup probe gives the load its budget,
        # after which liveness (a wedged process) and readiness (draining) take over
        "startupProbe": _probe(
            "/ready",
            period=STARTUP_PERIOD_S,
            failures=math.ceil(spec.startup_budget_s / STARTUP_PERIOD_S),
            timeout=5,
        ),
        "readinessProbe": _probe("/ready", period=5, failures=2, timeout=5),
        "livenessProbe": _probe("/health", period=10, failures=6, timeout=5),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SLEEP_S)]}}},
        "volumeMounts": [
            {"name": "share", "mountPath": MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def deployment(spec: KubeSpec) -> Obj:
    pod_spec: Obj = {
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "containers": [container(spec)],
        "volumes": [
            {"name": "share", "persistentVolumeClaim": {"claimName": spec.claim}},
            # the container runtime's 64 MiB /dev/shm is too small for torch's shared tensors
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        ],
    }
    if spec.gpus:
        # GPU node pools are commonly tainted so that only GPU pods land there
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    body: Obj = {
        "selector": {"matchLabels": spec.labels},
        "strategy": {
            "type": "RollingUpdate",
            # a new pod must be ready before an old one goes: the endpoint never loses capacity
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        # a rollout that outlasts the startup budget has failed (deploy then undoes it)
        "progressDeadlineSeconds": spec.startup_budget_s + 120,
        "revisionHistoryLimit": 5,
        "template": {
            "metadata": {
                "labels": spec.labels,
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(TARGET_PORT),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": pod_spec,
        },
    }
    if not spec.autoscaled:
        # with an autoscaler the replica count is its: leaving it out keeps apply from resetting it
        body = {"replicas": 1, **body}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": spec.meta(spec.app),
        "spec": body,
    }


def service(spec: KubeSpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": spec.meta(spec.app),
        "spec": {
            "type": spec.service_type,
            "selector": spec.labels,
            "ports": [
                {"name": "http", "port": TARGET_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def disruption_budget(spec: KubeSpec) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": spec.meta(spec.app),
        "spec": {
            # a drain waits until another replica is ready rather than dropping the endpoint
            "minAvailable": 1,
            "selector": {"matchLabels": spec.labels},
            # a pod that never became ready holds nothing: let drains evict it
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def waiting_query(spec: KubeSpec) -> str:
    """Requests queued across the app's pods (Deployment pods are <app>-<hash>-<suffix>)."""
    return (
        f'sum(tuneserve_requests_waiting{{namespace="{spec.namespace}",'
        f'pod=~"{re.escape(spec.app)}-[^-]+-[^-]+"}})'
    )


def autoscaler(spec: KubeSpec) -> Obj | None:
    """Replicas between 1 and max_replicas on queue depth. GPU utilisation and CPU say nothing
    here (a busy GPU is busy at any load); requests waiting for a place in the batch are what
    another replica would serve."""
    if not spec.autoscaled:
        return None
    scale_down = {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}
    if spec.autoscaler == "keda":
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": spec.meta(spec.app),
            "spec": {
                "scaleTargetRef": {"name": spec.app},
                "minReplicaCount": 1,
                "maxReplicaCount": spec.max_replicas,
                "advanced": {
                    "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": scale_down}}
                },
                "triggers": [
                    {
                        "type": "prometheus",
                        "metadata": {
                            "serverAddress": spec.prometheus_url,
                            "query": waiting_query(spec),
                            "threshold": str(spec.target_waiting),
                        },
                    }
                ],
            },
        }
    # a plain HPA reads the same gauge as a Pods metric through the custom metrics API
    # (prometheus-adapter exposing tuneserve_requests_waiting)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": spec.meta(spec.app),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.app},
            "minReplicas": 1,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "tuneserve_requests_waiting"},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(spec.target_waiting),
                        },
                    },
                }
            ],
            "behavior": {"scaleDown": scale_down},
        },
    }


# Streams (SSE) stay open for a whole generation: ingress-nginx's defaults (60 s reads, buffered
# responses) would cut long answers and hold tokens back.
INGRESS_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-body-size": "64m",
}
SCRAPE_INTERVAL = "15s"


def ingress(spec: KubeSpec) -> Obj | None:
    """The Service under a host name, through the cluster's default ingress class."""
    if not spec.ingress_host:
        return None
    meta = spec.meta(spec.app)
    meta["annotations"] = dict(INGRESS_ANNOTATIONS)
    backend = {"service": {"name": spec.app, "port": {"name": "http"}}}
    body: Obj = {
        "rules": [
            {
                "host": spec.ingress_host,
                "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]},
            }
        ]
    }
    if spec.ingress_tls_secret:
        body["tls"] = [{"hosts": [spec.ingress_host], "secretName": spec.ingress_tls_secret}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": meta, "spec": body}


def service_monitor(spec: KubeSpec) -> Obj | None:
    """The Prometheus operator's scrape of every pod behind the Service (/metrics is open: see
    server/auth.py), so the autoscaler's query and routers' vllm: gauges have their series."""
    if not spec.service_monitor:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": spec.meta(spec.app),
        "spec": {
            "selector": {"matchLabels": spec.labels},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": SCRAPE_INTERVAL}],
        },
    }
