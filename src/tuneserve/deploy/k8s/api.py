"""The slice of the Kubernetes API tuneserve uses, through the official `kubernetes` client's
ApiClient (its kubeconfig loading, auth and TLS), with plain dicts in and out: the objects are
rendered as dicts, and custom resources (KEDA's ScaledObject) have no typed model anyway.

    apply(obj)        server-side apply (PATCH application/apply-patch+yaml, fieldManager,
                      force): creates or updates, and running it again changes nothing
    get / select      objects by kind and name, by label selector
    serves            whether an API group/version (KEDA's, the Prometheus operator's) is served
    merge_patch / json_patch   RFC 7386 and RFC 6902 patches
    log_lines(pod)    a pod's log, its tail or followed
    delete            an object, if it is there
    exec_in(pod, argv, stdin)   a command in a pod over the exec websocket (kubernetes.stream,
                      what `kubectl exec`/`kubectl cp` use): bytes streamed to its stdin, its
                      exit code, stdout and stderr back

The exec websocket: the client offers v5.channel.k8s.io then v4.channel.k8s.io, and the API server
takes the first it serves (a 1.30+ API server, whose stream translator serves v5: v5; an older
one, proxying to the kubelet: v4). Nothing here depends on which: stdin is never closed (v4
cannot), so a command reading stdin stops by itself, and the exit status is read from channel 3,
which both carry the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tuneserve.errors import ProviderError

FIELD_MANAGER = "tuneserve"
ERROR_CHANNEL = 3  # the exec stream's channel for the command's exit Status
INSTALL_HINT = "pip install 'tuneserve[kubernetes]'"


@dataclass(frozen=True)
class Kind:
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None) -> str:
        root = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced:
            root += f"/namespaces/{namespace}"
        return f"{root}/{self.plural}" + (f"/{name}" if name else "")


# the kinds manifests.py renders, and the ReplicaSets and Pods a rollout is read from
KINDS: dict[str, Kind] = {
    "Namespace": Kind("", "v1", "namespaces", namespaced=False),
    "PersistentVolume": Kind("", "v1", "persistentvolumes", namespaced=False),
    "PersistentVolumeClaim": Kind("", "v1", "persistentvolumeclaims"),
    "Secret": Kind("", "v1", "secrets"),
    "Service": Kind("", "v1", "services"),
    "Pod": Kind("", "v1", "pods"),
    "Deployment": Kind("apps", "v1", "deployments"),
    "ReplicaSet": Kind("apps", "v1", "replicasets"),
    "PodDisruptionBudget": Kind("policy", "v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": Kind("autoscaling", "v2", "horizontalpodautoscalers"),
    "ScaledObject": Kind("keda.sh", "v1alpha1", "scaledobjects"),
    "Ingress": Kind("networking.k8s.io", "v1", "ingresses"),
    "ServiceMonitor": Kind("monitoring.coreos.com", "v1", "servicemonitors"),
    "CustomResourceDefinition": Kind(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", namespaced=False
    ),
}


@dataclass(frozen=True)
class ExecResult:
    code: int
    stdout: bytes
    stderr: bytes


class KubeApiError(ProviderError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def connect(context: str | None) -> Any:
    """An ApiClient for the kubeconfig's context (None: its current one)."""
    try:
        from kubernetes import config
    except ImportError:
        raise ProviderError(f"the kubernetes provider needs its client: {INSTALL_HINT}") from None
    try:
        # read KUBECONFIG now: the client's own default froze it when it was imported
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=where, context=context
        )
    except (config.ConfigException, OSError, TypeError) as exc:
        which = f"context {context!r}" if context else "the current context"
        raise ProviderError(
            f"cannot use {which} of the kubeconfig (KUBECONFIG, else ~/.kube/config): {exc}"
        ) from None


class KubeApi:
    def __init__(self, client: Any, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str | None = None,
        stream: bool = False,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.client.param_serialize(
            method,
            path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.client.call_api(method, url, header_params=headers, body=body)
        except Exception as exc:  # urllib3's and the client's own: the cluster is not reachable
            host = self.client.configuration.host
            raise ProviderError(f"the Kubernetes API at {host} did not answer: {exc}") from None
        if stream and response.status < 400:
            return response.response
        data = response.read()
        if response.status >= 400:
            raise KubeApiError(
                f"{method} {path}: {response.status} {_reason(data)}", response.status
            )
        if "application/json" in (response.getheader("Content-Type") or ""):
            return json.loads(data)
        return data.decode("utf-8", "replace")

    def path(self, kind: str, name: str | None = None, namespace: str | None = None) -> str:
        return KINDS[kind].path(namespace or self.namespace, name)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = self.path(obj["kind"], meta["name"], meta.get("namespace"))
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        try:
            result: dict[str, Any] = self.request(
                "PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml"
            )
        except KubeApiError as exc:
            if exc.status != 403:
                raise
            raise KubeApiError(f"{exc} ({_rights_needed(obj['kind'])})", 403) from None
        return result

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.request("GET", self.path(kind, name))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def serves(self, group: str, version: str, plural: str | None = None) -> bool:
        """Whether the cluster serves the API group/version (and its resource `plural`), read
        from API discovery (/apis/GROUP/VERSION), which every authenticated user may read, where
        a CustomResourceDefinition needs cluster-wide read rights. An aggregated API registered
        but unavailable (503, a metrics adapter down) counts as not served."""
        try:
            found = self.request("GET", f"/apis/{group}/{version}")
        except KubeApiError as exc:
            if exc.status in (404, 503):
                return False
            raise
        if plural is None:
            return True
        resources = found.get("resources", []) if isinstance(found, dict) else []
        return any(r.get("name") == plural for r in resources)

    def select(self, kind: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
        items: list[dict[str, Any]] = self.request("GET", self.path(kind), query=query)["items"]
        return items

    def merge_patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PATCH", self.path(kind, name), body=patch, content_type="application/merge-patch+json"
        )
        return result

    def json_patch(self, kind: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """RFC 6902 operations: a whole field replaced, where a merge patch would merge maps."""
        result: dict[str, Any] = self.request(
            "PATCH", self.path(kind, name), body=ops, content_type="application/json-patch+json"
        )
        return result

    def delete(self, kind: str, name: str) -> None:
        try:
            self.request("DELETE", self.path(kind, name))
        except KubeApiError as exc:
            if exc.status != 404:
                raise

    def exec_in(
        self,
        pod: str,
        argv: list[str],
        stdin: Iterable[bytes] | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> ExecResult:
        """Run argv in the pod's first container; stdin's chunks are written as they come (a
        command reading stdin must stop by itself, e.g. `head -c N`: stdin is not closed, which
        v4 cannot do), and on_sent hears each chunk's size. A command that did not run (the
        Status on channel 3 is not Success nor an exit code) comes back with code -1 and the
        Status's message at the end of stderr."""
        from kubernetes import client as kube_client
        from kubernetes.stream import stream

        core = kube_client.CoreV1Api(self.client)
        try:
            ws = stream(
                core.connect_get_namespaced_pod_exec,
                pod,
                self.namespace,
                command=argv,
                stdin=stdin is not None,
                stdout=True,
                stderr=True,
                tty=False,
                binary=True,
                _preload_content=False,
            )
        except Exception as exc:  # the client's ApiException, websocket's handshake errors
            raise ProviderError(f"cannot exec in pod {pod!r}: {exc}") from None
        out, err = bytearray(), bytearray()
        try:
            for chunk in stdin or ():
                ws.write_stdin(chunk)
                if on_sent:
                    on_sent(len(chunk))
                ws.update(timeout=0)
                out += ws.read_stdout() if ws.peek_stdout() else b""
                err += ws.read_stderr() if ws.peek_stderr() else b""
            while ws.is_open():
                ws.update(timeout=1)
                out += ws.read_stdout() if ws.peek_stdout() else b""
                err += ws.read_stderr() if ws.peek_stderr() else b""
            out += ws.read_stdout() if ws.peek_stdout() else b""
            err += ws.read_stderr() if ws.peek_stderr() else b""
            code, why = exit_status(ws.read_channel(ERROR_CHANNEL))
        finally:
            ws.close()
        if why:  # the command did not run (or its end was not told): say why, as kubectl does
            if err and not err.endswith(b"\n"):
                err += b"\n"
            err += why.encode() + b"\n"
        return ExecResult(code, bytes(out), bytes(err))

    def log_lines(self, pod: str, *, tail: int, follow: bool = False) -> Iterator[str]:
        query = [("tailLines", str(tail))] + ([("follow", "true")] if follow else [])
        path = self.path("Pod", pod) + "/log"
        if not follow:
            yield from str(self.request("GET", path, query=query)).splitlines()
            return
        response = self.request("GET", path, query=query, stream=True)
        try:
            for raw in response:
                yield raw.decode("utf-8", "replace").rstrip("\n")
        finally:
            response.release_conn()


def exit_status(raw: bytes | str) -> tuple[int, str]:
    """The exit code in the Status the API server writes on the exec stream's channel 3, and, when
    there is none, -1 and why: Success is 0, NonZeroExitCode carries the code in an ExitCode
    cause, and anything else (InternalError: the executable not found, the container gone) is
    the message. (The client's own `returncode` takes any cause's message for the code.)"""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if not text.strip():
        return -1, "the exec stream ended without the command's exit status"
    try:
        status = json.loads(text)
    except ValueError:
        status = None
    if isinstance(status, dict):
        if status.get("status") == "Success":
            return 0, ""
        if status.get("reason") == "NonZeroExitCode":
            for cause in (status.get("details") or {}).get("causes") or []:
                if cause.get("reason") == "ExitCode" and str(cause.get("message", "")).isdigit():
                    return int(cause["message"]), ""
    return -1, _reason(text.strip().encode())


def _rights_needed(kind: str) -> str:
    """What a 403 on applying `kind` means for whoever runs provision."""
    if KINDS[kind].namespaced:
        return (
            f"the kubeconfig's user needs the right to create and patch {KINDS[kind].plural} "
            "in this namespace: a Role (or the namespace's admin ClusterRole) bound to it"
        )
    hint = (
        f"{kind} is cluster-scoped: rights in a namespace do not cover it; the kubeconfig's user "
        f"needs a ClusterRole allowing create and patch on {KINDS[kind].plural}"
    )
    if kind == "PersistentVolume":
        hint += " (or provision with --storage-class NAME: a claim on a class needs no volume)"
    elif kind == "Namespace":
        hint += " (or have the namespace made for you and provision into it)"
    return hint


def _reason(data: bytes) -> str:
    try:
        status = json.loads(data)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        return data.decode("utf-8", "replace")[:300]
    return str(status.get("message") or status.get("reason") or status)[:300]
