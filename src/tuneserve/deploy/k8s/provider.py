"""The Kubernetes provider: `tuneserve provision --provider kubernetes` renders infra/kubernetes/.

infra/inference.config.json keeps its six keys, with this provider's meaning:

    SUBSCRIPTION_ID       the kubeconfig context (--context, else the kubeconfig's current one)
    RESOURCE_GROUP_NAME   the namespace
    STORAGE_ACCOUNT_NAME  the Azure storage account of the share, or the RWX storage class
    FILE_SHARE_NAME       the Azure Files share, or the claim the storage class provisions
    ACA_APP_NAME          the Deployment and Service
    ACA_APP_ENDPOINT      the Service inside the cluster (http://APP.NAMESPACE.svc.cluster.local:7860)

What is built: rendering. Applying the objects and rolling a deploy through the API are not (see
README "Deploy -> Kubernetes"); until then the commands that would need them say what to run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.markup import escape

from tuneserve.deploy.base import (
    Ask,
    DeployResult,
    Provider,
    ProvisionRequest,
    StatusReport,
    option,
)
from tuneserve.deploy.infra import TARGET_PORT, FinetuningConfig, InferenceConfig
from tuneserve.deploy.k8s import manifests as m
from tuneserve.deploy.k8s import render
from tuneserve.deploy.shares import SyncTarget
from tuneserve.errors import ProviderError

MANIFESTS_DIR = "kubernetes"  # under infra/
DEFAULT_NAMESPACE = "default"
CURRENT_CONTEXT = "current-context"  # written when no kubeconfig names one
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


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
        "keda (default: a ScaledObject on queued requests), hpa (the same gauge through the "
        "custom metrics API) or none."
    )
    prometheus_url: str | None = option(
        f"the Prometheus the KEDA trigger queries (default: {m.DEFAULT_PROMETHEUS})."
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

    @classmethod
    def scope(
        cls,
        subscription: str | None,
        resource_group: str | None,
        finetuning: FinetuningConfig | None,
        ask: Ask | None,
    ) -> tuple[str, str]:
        """The fine-tuning step's subscription and group seed the derived names (so a null
        storageAccountName is the fine-tuning step's account, as on Azure); nothing is asked."""
        return (
            subscription or getattr(finetuning, "SUBSCRIPTION_ID", None) or cls.name,
            resource_group or getattr(finetuning, "RESOURCE_GROUP_NAME", None) or cls.name,
        )

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
        )

    def _storage_group(self, request: KubernetesProvisionRequest) -> str | None:
        """The resource group of the fine-tuning step's storage account, where it is known."""
        if request.finetuning and request.finetuning.RESOURCE_GROUP_NAME:
            return request.finetuning.RESOURCE_GROUP_NAME
        return request.resource_group if request.resource_group != self.name else None

    def provision(self, request: KubernetesProvisionRequest) -> InferenceConfig:
        if request.keys is None:
            raise ProviderError("the Kubernetes Secret needs the endpoint's keys")
        spec = self.spec(request)
        files = render.write(self.manifests_dir, render.render(spec, request.keys))
        context = request.context or kubeconfig_context() or CURRENT_CONTEXT
        for path in files:
            self.console.print(f"  rendered {self.paths.rel(path)}")
        if isinstance(spec.storage, m.AzureFilesShare):
            self._explain_storage_secret(spec, spec.storage, context)
        apply = (
            f"{kubectl(context)} apply --server-side --field-manager tuneserve "
            f"-f {self.paths.rel(self.manifests_dir)}/"
        )
        if request.dry_run:
            self.console.print(f"Dry run: no cluster reached. Apply later with: {apply}")
        else:
            self.console.print(
                "tuneserve does not apply to a cluster itself yet (README: Deploy -> "
                f"Kubernetes). Apply with: {apply}"
            )
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
                f"http://{spec.app}.{spec.namespace}.svc.cluster.local:{TARGET_PORT}"
            ),
            PROVIDER=self.name,
        )

    def _explain_storage_secret(
        self, spec: m.KubeSpec, share: m.AzureFilesShare, context: str
    ) -> None:
        """The volume mounts with the account's key, which only Azure can tell: the user
        creates that Secret once (the fine-tuning step's account, so it exists already)."""
        rg = share.resource_group or "<resource group>"
        key = f"$(az storage account keys list -g {rg} -n {share.account} --query [0].value -o tsv)"
        name_field, key_field = m.AZURE_SECRET_FIELDS
        self.console.print(
            escape(
                f"The volume on Azure Files share {share.share!r} of {share.account!r} mounts with "
                f"the account's key; create its Secret once:\n  {kubectl(context, spec.namespace)} "
                f"create secret generic {share.secret} "
                f"--from-literal={name_field}={share.account} --from-literal={key_field}={key}"
            )
        )

    # -- not built yet: each says what to do instead ------------------------------------------

    def _not_built(self, what: str, instead: str) -> ProviderError:
        return ProviderError(
            f"{what} is not built for the kubernetes provider yet; {instead} "
            "(README: Deploy -> Kubernetes)"
        )

    def _kubectl(self) -> str:
        config = self._config()
        return kubectl(str(config.SUBSCRIPTION_ID), config.RESOURCE_GROUP_NAME)

    def share_target(self) -> SyncTarget:
        raise self._not_built(
            "syncing the workspace to the cluster's share",
            "copy it onto the volume yourself, then "
            f"'{self._kubectl()} rollout restart deployment/{self._config().ACA_APP_NAME}'",
        )

    def roll_out(self, sync_summary: str, *, timeout: float, replicas: int | None) -> DeployResult:
        raise self._not_built(
            "rolling the Deployment",
            f"run '{self._kubectl()} rollout restart deployment/{self._config().ACA_APP_NAME}'",
        )

    def status(self, *, api_key: str | None = None) -> StatusReport:
        raise self._not_built(
            "status", f"run '{self._kubectl()} get deploy,pods -l app.kubernetes.io/name=tuneserve'"
        )

    def logs(
        self, *, tail: int = 100, follow: bool = False, revision: str | None = None
    ) -> Iterator[str]:
        raise self._not_built(
            "logs", f"run '{self._kubectl()} logs deployment/{self._config().ACA_APP_NAME}'"
        )

    def stop(self) -> str:
        raise self._not_built(
            "stop",
            f"run '{self._kubectl()} scale deployment/{self._config().ACA_APP_NAME} --replicas 0'",
        )

    def replica_urls(self) -> list[str]:
        return [self._config().endpoint_url]
