"""The Kubernetes provider: `tuneserve provision --provider kubernetes` renders infra/kubernetes/.

infra/inference.config.json keeps its six keys, with this provider's meaning:

    SUBSCRIPTION_ID       the kubeconfig context (--context, else the kubeconfig's current one)
    RESOURCE_GROUP_NAME   the namespace
    STORAGE_ACCOUNT_NAME  the Azure storage account of the share, or the RWX storage class
    FILE_SHARE_NAME       the Azure Files share, or the claim the storage class provisions
    ACA_APP_NAME          the Deployment and Service
    ACA_APP_ENDPOINT      http(s)://HOST with --ingress-host, else the Service inside the cluster
                          (http://APP.NAMESPACE.svc.cluster.local:7860)

provision renders infra/kubernetes/ and (without --dry-run) applies it server-side; deploy syncs
the Azure Files share (or a storage class's volume, through a short-lived pod: podshare.py),
then rolls the Deployment by its pod template's revision annotation and undoes the rollout when
the new pods do not become ready (deploy/k8s/rollout.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from tuneserve.deploy.base import (
    DeployResult,
    Provider,
    ProvisionRequest,
    StatusReport,
    option,
)
from tuneserve.deploy.http import http_get
from tuneserve.deploy.infra import TARGET_PORT, InferenceConfig
from tuneserve.deploy.k8s import manifests as m
from tuneserve.deploy.k8s import render, rollout
from tuneserve.deploy.k8s.api import KubeApi, KubeApiError, connect
from tuneserve.deploy.k8s.podshare import PodShareTarget
from tuneserve.deploy.shares import SyncTarget
from tuneserve.deploy.sync import SyncResult
from tuneserve.deploy.waiting import wait_until
from tuneserve.errors import ProviderError

MANIFESTS_DIR = "kubernetes"  # under infra/
DEFAULT_NAMESPACE = "default"
CURRENT_CONTEXT = "current-context"  # written when no kubeconfig names one
KEDA_PAUSED = "autoscaling.keda.sh/paused-replicas"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
# the APIs provision looks for, by discovery: (group, version, plural)
KEDA_API = ("keda.sh", "v1alpha1", "scaledobjects")
MONITOR_API = ("monitoring.coreos.com", "v1", "servicemonitors")
CUSTOM_METRICS_API = ("custom.metrics.k8s.io", "v1beta1")


@dataclass
class KubernetesProvisionRequest(ProvisionRequest):
    context: str | None = option("the kubeconfig context (default: its current context).")
    namespace: str | None = option(f"the namespace (default: {DEFAULT_NAMESPACE}).")
    dry_run: bool | None = option(
        "render infra/kubernetes/ only: no cluster is reached (kubectl can apply it later)."
    )
    gpus: int | None = option("nvidia.com/gpu per replica (default: 1; 0 runs on CPU).")
    storage_class: str | None = option(
        "a ReadWriteMany storage class for the share (default: a static volume on the "
        "fine-tuning step's Azure Files share)."
    )
    service_type: str | None = option("ClusterIP (default) or LoadBalancer.")
    autoscaler: str | None = option(
        "keda (default where the cluster has KEDA: a ScaledObject on queued requests), hpa (the "
        "same gauge through the custom metrics API; the default where KEDA is absent) or none."
    )
    prometheus_url: str | None = option(
        f"the Prometheus the KEDA trigger queries (default: {m.DEFAULT_PROMETHEUS})."
    )
    ingress_host: str | None = option(
        "serve the endpoint under this host name through an Ingress (the cluster's default "
        "ingress class); the endpoint becomes http(s)://HOST."
    )
    ingress_tls_secret: str | None = option(
        "a kubernetes.io/tls Secret in the namespace for --ingress-host: the endpoint is https."
    )


def kubeconfig_context() -> str | None:
    """The current context of the kubeconfig the client would read (KUBECONFIG, else
    ~/.kube/config), or None where there is none."""
    candidates = os.environ.get("KUBECONFIG", "").split(os.pathsep)
    candidates = [c for c in candidates if c] or [str(Path.home() / ".kube" / "config")]
    for candidate in candidates:
        try:
            data = yaml.safe_load(Path(candidate).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("current-context"), str):
            return str(data["current-context"])
    return None


def _secret_present(api: KubeApi, name: str) -> bool | None:
    """Whether the Secret `name` is in the namespace; None when the kubeconfig's user may not
    read Secrets (a deploy does not need to: the kubelet mounts it)."""
    try:
        return api.get("Secret", name) is not None
    except KubeApiError as exc:
        if exc.status == 403:
            return None
        raise


def storage_secret_command(share: m.AzureFilesShare, context: str, namespace: str) -> str:
    """The kubectl command creating the Secret an Azure Files volume mounts with: the account's
    key, which only Azure can tell (the fine-tuning step's account, so it exists already)."""
    rg = share.resource_group or "<resource group>"
    key = f"$(az storage account keys list -g {rg} -n {share.account} --query [0].value -o tsv)"
    name_field, key_field = m.AZURE_SECRET_FIELDS
    return (
        f"{kubectl(context, namespace)} create secret generic {share.secret} "
        f"--from-literal={name_field}={share.account} --from-literal={key_field}={key}"
    )


def kubectl(context: str, namespace: str | None = None) -> str:
    """The kubectl command line reaching the same cluster and namespace."""
    words = ["kubectl"]
    if context != CURRENT_CONTEXT:
        words += ["--context", context]
    if namespace:
        words += ["-n", namespace]
    return " ".join(words)


def _choice(flag: str, value: str | None, default: str, accepted: tuple[str, ...]) -> str:
    chosen = value or default
    if chosen not in accepted:
        raise ProviderError(f"{flag} {chosen!r}: accepted are {', '.join(accepted)}")
    return chosen


class KubernetesProvider(Provider):
    name = "kubernetes"
    summary = "a Kubernetes cluster (AKS or any other)"
    request_type = KubernetesProvisionRequest
    # a rollout waits for the new pods' model load; their startup probe allows this much
    default_timeout_s = float(m.DEFAULT_STARTUP_BUDGET_S)
    poll_s = 2.0  # between reads of a rollout's state
    scope_source = "finetuning"

    @property
    def manifests_dir(self) -> Path:
        return self.paths.infra / MANIFESTS_DIR

    def spec(self, request: KubernetesProvisionRequest) -> m.KubeSpec:
        names = request.resolved_names()
        app = names["acaAppName"]
        namespace = request.namespace or DEFAULT_NAMESPACE
        if not _DNS_LABEL.fullmatch(namespace):
            raise ProviderError(
                f"--namespace {namespace!r}: a namespace is lowercase letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        gpus = 1 if request.gpus is None else request.gpus
        if gpus < 0:
            raise ProviderError(f"--gpus {gpus}: give 0 (CPU only) or more")
        storage: m.AzureFilesShare | m.ClassShare
        if request.storage_class:
            storage = m.ClassShare(request.storage_class)
        else:
            storage = m.AzureFilesShare(
                account=names["storageAccountName"],
                share=names["fileShareName"],
                resource_group=self._storage_group(request),
                secret=f"{app}-storage",
            )
        params = request.parameters.parameters
        return m.KubeSpec(
            app=app,
            namespace=namespace,
            commands=list(params.defaultCommands.value),
            storage=storage,
            max_replicas=params.maximumInstanceCount.value,
            gpus=gpus,
            service_type=_choice(
                "--service-type", request.service_type, "ClusterIP", m.SERVICE_TYPES
            ),
            autoscaler=_choice("--autoscaler", request.autoscaler, "keda", m.AUTOSCALERS),
            prometheus_url=request.prometheus_url or m.DEFAULT_PROMETHEUS,
            ingress_host=self._ingress_host(request),
            ingress_tls_secret=request.ingress_tls_secret,
        )

    @staticmethod
    def _ingress_host(request: KubernetesProvisionRequest) -> str | None:
        host = request.ingress_host
        if request.ingress_tls_secret and not host:
            raise ProviderError("--ingress-tls-secret needs --ingress-host (the host it serves)")
        if host is not None and not _HOST.fullmatch(host):
            raise ProviderError(
                f"--ingress-host {host!r}: give a DNS name such as chat.example.com (lowercase, "
                "no scheme, no port; a leading '*.' is allowed)"
            )
        return host

    def _storage_group(self, request: KubernetesProvisionRequest) -> str | None:
        """The resource group of the fine-tuning step's storage account, where it is known."""
        if request.finetuning and request.finetuning.RESOURCE_GROUP_NAME:
            return request.finetuning.RESOURCE_GROUP_NAME
        return request.resource_group if request.resource_group != self.name else None

    def provision(self, request: KubernetesProvisionRequest) -> InferenceConfig:
        if request.keys is None:
            raise ProviderError("the Kubernetes Secret needs the endpoint's keys")
        spec = self.spec(request)
        context = request.context or kubeconfig_context() or CURRENT_CONTEXT
        api = None if request.dry_run else kube_api(context, spec.namespace)
        if api is not None:
            spec = self._fit_to_cluster(api, spec, chosen_autoscaler=request.autoscaler)
        files = render.write(self.manifests_dir, render.render(spec, request.keys))
        for path in files:
            self.console.print(f"  rendered {self.paths.rel(path)}")
        if isinstance(spec.storage, m.AzureFilesShare):
            share = spec.storage
            if api is not None and _secret_present(api, share.secret):
                self.console.print(f"  the volume mounts with Secret {share.secret} (present)")
            else:
                self.console.print(
                    escape(
                        f"The volume on Azure Files share {share.share!r} of {share.account!r} "
                        "mounts with the account's key; create its Secret once:\n  "
                        + storage_secret_command(share, context, spec.namespace)
                    )
                )
        apply = (
            f"{kubectl(context)} apply --server-side --field-manager tuneserve "
            f"-f {self.paths.rel(self.manifests_dir)}/"
        )
        if api is None:
            self.console.print(
                f"Dry run: no cluster reached (so no ServiceMonitor: provision without --dry-run "
                f"renders one where the Prometheus operator is installed). Apply later with: "
                f"{apply}"
            )
        else:
            if not spec.service_monitor:
                self.console.print(
                    f"No ServiceMonitor: the cluster has no {SERVICE_MONITOR_CRD} (the Prometheus "
                    "operator); pods still carry prometheus.io/scrape annotations."
                )
            self._apply(api, render.read(self.manifests_dir))
        storage = spec.storage
        return InferenceConfig(
            SUBSCRIPTION_ID=context,
            RESOURCE_GROUP_NAME=spec.namespace,
            STORAGE_ACCOUNT_NAME=(
                storage.account if isinstance(storage, m.AzureFilesShare) else storage.storage_class
            ),
            FILE_SHARE_NAME=storage.share if isinstance(storage, m.AzureFilesShare) else spec.claim,
            ACA_APP_NAME=spec.app,
            ACA_APP_ENDPOINT=(
                f"{'https' if spec.ingress_tls_secret else 'http'}://{spec.ingress_host}"
                if spec.ingress_host
                else f"http://{spec.app}.{spec.namespace}.svc.cluster.local:{TARGET_PORT}"
            ),
            PROVIDER=self.name,
        )

    def _fit_to_cluster(
        self, api: KubeApi, spec: m.KubeSpec, *, chosen_autoscaler: str | None
    ) -> m.KubeSpec:
        """What the cluster has decides two things: a ServiceMonitor where the Prometheus
        operator's API is served, and, unless --autoscaler says, KEDA's ScaledObject where KEDA
        is installed, else a plain HPA on the same gauge."""
        if api.serves(*MONITOR_API):
            spec = dataclasses.replace(spec, service_monitor=True)
        if spec.autoscaled and chosen_autoscaler is None and not api.serves(*KEDA_API):
            spec = dataclasses.replace(spec, autoscaler="hpa")
            self.console.print(
                "The cluster has no KEDA (no keda.sh/v1alpha1 scaledobjects): the autoscaler is "
                "a plain HorizontalPodAutoscaler on tuneserve_requests_waiting instead "
                "(--autoscaler keda or none to choose)."
            )
        if spec.autoscaled and spec.autoscaler == "hpa" and not api.serves(*CUSTOM_METRICS_API):
            self.console.print(
                "[yellow]warning:[/] the HPA reads tuneserve_requests_waiting through the custom "
                "metrics API (custom.metrics.k8s.io/v1beta1, e.g. prometheus-adapter), which this "
                "cluster does not serve: it will not scale until that API is there."
            )
        return spec

    def _apply(self, api: KubeApi, objects: list[dict[str, Any]]) -> None:
        """Server-side apply of each object, in file order: creates what is missing, updates
        what differs, and a second run changes nothing."""
        for obj in objects:
            what = f"{obj['kind']}/{obj['metadata']['name']}"
            try:
                api.apply(obj)
            except KubeApiError as exc:
                if obj["kind"] == "ScaledObject" and exc.status == 404:
                    self.console.print(
                        f"[yellow]warning:[/] {what} not applied: the cluster has no KEDA "
                        "(no ScaledObject API). Install KEDA, or provision with --autoscaler hpa "
                        "or none."
                    )
                    continue
                raise
            self.console.print(f"  applied {what}")

    # -- deploy -----------------------------------------------------------------------------

    def _api(self) -> KubeApi:
        config = self._config()
        return kube_api(str(config.SUBSCRIPTION_ID), str(config.RESOURCE_GROUP_NAME))

    @property
    def app(self) -> str:
        return str(self._config().ACA_APP_NAME)

    @property
    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "tuneserve", "app.kubernetes.io/instance": self.app}

    def share_target(self) -> SyncTarget:
        """The Azure Files share the static volume mounts, reached as the Azure provider reaches
        it; a storage class's volume through a short-lived pod mounting its claim (podshare.py),
        which sync_workspace starts and deletes."""
        storage = [o for o in self._manifests() if o["kind"] == "PersistentVolume"]
        if storage and storage[0]["spec"].get("csi", {}).get("driver") == "file.csi.azure.com":
            from tuneserve.deploy.azure import AzureProvider

            return AzureProvider(self.paths, self._config(), self.console).share_target()
        claim = str(self._config().FILE_SHARE_NAME)
        return PodShareTarget(self._api(), f"{self.app}-sync", claim, self.selector)

    def sync_workspace(
        self,
        target: SyncTarget,
        *,
        prune: bool,
        force: bool,
        include_model_cache: bool | None,
    ) -> SyncResult:
        if not isinstance(target, PodShareTarget):
            return super().sync_workspace(
                target, prune=prune, force=force, include_model_cache=include_model_cache
            )
        with contextlib.ExitStack() as pod:
            with self.console.status(f"Starting pod {target.pod} to reach claim {target.claim}"):
                pod.enter_context(target.opened())
            return super().sync_workspace(
                target, prune=prune, force=force, include_model_cache=include_model_cache
            )

    def _manifests(self) -> list[dict[str, Any]]:
        if not self.manifests_dir.is_dir():
            raise ProviderError(
                f"{self.paths.rel(self.manifests_dir)}/ not found: run "
                "'tuneserve provision --provider kubernetes' first"
            )
        return render.read(self.manifests_dir)

    def deploying(self, replicas: int | None) -> contextlib.AbstractContextManager[None]:
        self._check_storage_secret(self._api())  # before the sync: nothing is changed
        return super().deploying(replicas)

    def roll_out(self, sync_summary: str, *, timeout: float, replicas: int | None) -> DeployResult:
        # 1. (the sync) done: the share holds the workspace
        api = self._api()
        deployment = api.get("Deployment", self.app)
        if deployment is None:
            raise ProviderError(
                f"deployment {self.app!r} is not in namespace {api.namespace!r}: run "
                "'tuneserve provision --provider kubernetes' (without --dry-run) first"
            )
        previous = rollout.template_revision(deployment)
        serving = deployment.get("status", {}).get("availableReplicas", 0) > 0
        revision = rollout.next_revision(self.app, previous)

        # 2. a new pod template: the controller starts new pods beside the old ones
        patch: dict[str, Any] = {
            "spec": {"template": {"metadata": {"annotations": {m.REVISION_ANNOTATION: revision}}}}
        }
        if replicas or deployment["spec"].get("replicas") == 0:  # after 'tuneserve stop'
            patch["spec"]["replicas"] = replicas or 1
            self._resume_autoscaler(api)
        api.merge_patch("Deployment", self.app, patch)

        # 3. wait for the new pods; on failure put the old template back (its pods never left)
        last = rollout.Progress(False, None, "")

        def rolled() -> bool:
            nonlocal last
            current = api.get("Deployment", self.app) or {}
            last = rollout.progress(current, rollout.pods_of(api, self.selector, revision))
            if last.failed:
                raise _RolloutFailed(last.failed)
            return last.done

        try:
            with self.console.status(f"Rolling out {revision}") as status:
                done = wait_until(
                    rolled,
                    timeout=timeout,
                    interval=self.poll_s,
                    on_wait=lambda s: status.update(
                        f"Rolling out {revision}: {last.message} ({s:.0f} s)"
                    ),
                )
            why = None if done else f"not ready after {timeout:.0f} s ({last.message})"
        except _RolloutFailed as exc:
            why = str(exc)
        except KeyboardInterrupt:  # an abandoned deploy leaves the old pods serving too
            rollout.undo(api, self.app, self.selector, failed=revision)
            raise
        if why is not None:
            logs = self._pod_logs(api, rollout.pods_of(api, self.selector, revision))
            back = rollout.undo(api, self.app, self.selector, failed=revision)
            if back:
                self.console.print(f"Undid the rollout: the pod template is {back}'s again")
            still = (previous or f"{self.app} (as provisioned)") if serving and back else None
            raise self.not_ready(revision, why, logs, still)
        ready = (api.get("Deployment", self.app) or {}).get("status", {})
        return DeployResult(
            revision, self.endpoint, sync_summary, replicas=ready.get("availableReplicas", 0)
        )

    def _check_storage_secret(self, api: KubeApi) -> None:
        """An Azure Files volume mounts with the account key's Secret: without it the new pods
        would wait in ContainerCreating until the deploy timed out. Refuse before changing
        anything."""
        volumes = [o for o in self._manifests() if o["kind"] == "PersistentVolume"]
        share = m.AzureFilesShare.of_volume(volumes[0]) if volumes else None
        if share is None or _secret_present(api, share.secret) is not False:
            return  # present, or not ours to read: the pods will tell
        context = str(self._config().SUBSCRIPTION_ID)
        raise ProviderError(
            f"nothing was changed: the volume on Azure Files share {share.share!r} of "
            f"{share.account!r} mounts with Secret {share.secret!r}, which is not in namespace "
            f"{api.namespace!r} (pods would wait to mount it until the deploy timed out). "
            f"Create it once:\n  {storage_secret_command(share, context, api.namespace)}"
        )

    def _pod_logs(
        self, api: KubeApi, pods: list[dict[str, Any]], tail: int = 15
    ) -> list[tuple[str, list[str]]]:
        logs = []
        for pod in pods:
            name = pod["metadata"]["name"]
            try:
                lines = list(api.log_lines(name, tail=tail))
            except ProviderError as exc:
                lines = [f"(no log: {exc})"]
            logs.append((f"Last lines of pod {name}:", lines))
        return logs

    def _resume_autoscaler(self, api: KubeApi) -> None:
        if api.get("ScaledObject", self.app) is not None:
            api.merge_patch(
                "ScaledObject", self.app, {"metadata": {"annotations": {KEDA_PAUSED: None}}}
            )

    # -- status, logs, stop -------------------------------------------------------------------

    def status(self, *, api_key: str | None = None) -> StatusReport:
        api = self._api()
        deployment = api.get("Deployment", self.app)
        report = StatusReport(self.name, self.app, self.endpoint, None, ready=False)
        if deployment is None:
            report.notes.append(f"deployment {self.app!r} not found in {api.namespace!r}")
            return report
        report.revision = rollout.template_revision(deployment)
        report.ready = deployment.get("status", {}).get("availableReplicas", 0) > 0
        for pod in api.select("Pod", self.selector):
            statuses = pod.get("status", {}).get("containerStatuses", [])
            annotations = pod["metadata"].get("annotations") or {}
            report.replicas.append(
                {
                    "name": pod["metadata"]["name"],
                    "phase": pod.get("status", {}).get("phase"),
                    "ready": rollout.pod_ready(pod),
                    "restarts": sum(c.get("restartCount", 0) for c in statuses),
                    "revision": annotations.get(m.REVISION_ANNOTATION),
                }
            )
        report.notes.append(
            f"the endpoint is the Service inside the cluster; from here: '{self._kubectl()} "
            f"port-forward svc/{self.app} {TARGET_PORT}'"
        )
        return report

    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]:
        api = self._api()
        revision = revision or rollout.template_revision(api.get("Deployment", self.app) or {})
        pods = [
            p
            for p in api.select("Pod", self.selector)
            if revision is None
            or (p["metadata"].get("annotations") or {}).get(m.REVISION_ANNOTATION) == revision
        ]
        if not pods:
            raise ProviderError(f"no pods of {self.app!r} ({revision or 'any revision'}) to read")
        names = [p["metadata"]["name"] for p in pods]
        if follow:
            return _follow_all(api, names, tail)
        return (f"[{n}] {line}" for n in names for line in api.log_lines(n, tail=tail))

    def stop(self) -> str:
        api = self._api()
        if api.get("ScaledObject", self.app) is not None:
            # KEDA would scale a stopped app back to its minimum: pause it at 0
            api.merge_patch(
                "ScaledObject", self.app, {"metadata": {"annotations": {KEDA_PAUSED: "0"}}}
            )
        # an HPA stops scaling a target whose replicas are 0, until they are set again
        api.merge_patch("Deployment", self.app, {"spec": {"replicas": 0}})
        return (
            f"Stopped {self.app} (replicas 0; its pods finish their requests within the grace "
            "period). 'tuneserve deploy' starts it again."
        )

    def _kubectl(self) -> str:
        config = self._config()
        return kubectl(str(config.SUBSCRIPTION_ID), config.RESOURCE_GROUP_NAME)

    def replica_urls(self) -> list[str]:
        """The endpoint (the Ingress host, or the Service where this machine is in the cluster)
        when it answers; pods are not addressed one by one: the rest rescan the share."""
        url = self._config().endpoint_url
        try:
            http_get(f"{url.rstrip('/')}/health", timeout=3.0)
        except Exception:  # DNS, refused, timeout: the Service is not reachable from here
            return []
        return [url]

    def no_replica_note(self) -> str:
        return (
            f"the endpoint {self._config().endpoint_url} is not reachable from here, so no pod "
            "was told: each pod picks the adapter up at its next rescan of the share (every 10 s "
            f"by default). To load it at once, '{self._kubectl()} port-forward svc/{self.app} "
            f"{TARGET_PORT}' and push again with --url http://127.0.0.1:{TARGET_PORT}"
        )


def _follow_all(api: KubeApi, pods: list[str], tail: int) -> Iterator[str]:
    """Every pod's log followed at once, lines interleaved as they come, each prefixed with its
    pod; ends when every stream has (the pods ended) or when the reader stops."""
    lines: queue.Queue[str | None] = queue.Queue(maxsize=1000)

    def follow(pod: str) -> None:
        try:
            for line in api.log_lines(pod, tail=tail, follow=True):
                lines.put(f"[{pod}] {line}")
        except ProviderError as exc:
            lines.put(f"[{pod}] (log ended: {exc})")
        finally:
            lines.put(None)

    for pod in pods:
        threading.Thread(target=follow, args=(pod,), daemon=True, name=f"logs-{pod}").start()
    running = len(pods)
    while running:
        line = lines.get()
        if line is None:
            running -= 1
        else:
            yield line


class _RolloutFailed(Exception):
    """The new pods cannot become ready (ends the wait)."""


def kube_api(context: str, namespace: str) -> KubeApi:
    return KubeApi(connect(None if context == CURRENT_CONTEXT else context), namespace)
