"""A loopback HTTP STAND-IN for the slice of the Kubernetes API the kubernetes provider calls,
because no cluster can run here. It is not Kubernetes and proves nothing about a real API server,
its admission, or a real Deployment controller: it answers in the API's wire shapes so the tests
can check that the official client's requests are the right ones and that the provider reads the
answers right.

What it checks of each request:
- a bearer token (the kubeconfig's), else 401; writes of the kinds in `forbidden`, and reads of
  those in `unreadable`, get the 403 an API server's RBAC gives (its message's words);
- server-side apply: PATCH with Content-Type application/apply-patch+yaml, fieldManager=tuneserve,
  force=true, a body whose apiVersion, kind, name and namespace match the URL;
- merge patches: Content-Type application/merge-patch+json, applied as RFC 7386; JSON patches
  (application/json-patch+json) only as `replace /spec/template`, what an undo sends;
- KEDA's API exists only when `keda` is set (404 otherwise, as an API server without the CRD),
  the Prometheus operator's only when `prometheus_operator` is set; each one's
  CustomResourceDefinition (apiextensions.k8s.io/v1: scaledobjects.keda.sh,
  servicemonitors.monitoring.coreos.com) and its API discovery (GET /apis/GROUP/VERSION, an
  APIResourceList) read back only then, as on a cluster with it installed; the custom metrics
  API's discovery (custom.metrics.k8s.io/v1beta1, prometheus-adapter's) only with
  `custom_metrics`. Other groups' discovery is not served (404).

What it emulates of the Deployment controller (on every request, under one lock): a pod template
it has not seen becomes a new ReplicaSet (revision = the highest + 1; an older template put back
becomes the newest again, as `rollout undo` does) with `replicas` pods. Pods whose template
carries a revision in `crashing` sit in CrashLoopBackOff and log a traceback; others are ready at
once. The Deployment's own strategy decides when old pods go: with RollingUpdate and
`maxUnavailable: 0` only once the new ReplicaSet's pods are all ready; with anything else (a
maxUnavailable above 0, Recreate) at once, ready or not, which is the worst a real controller
may do with them. So the tests' "the old pods still serve" rests on the rendered strategy, not
on the stand-in. `ready_counts` records the ready pods of each Deployment after every
reconcile, so a test can see that the endpoint never had none. The Deployment's status
(observedGeneration, replicas, updatedReplicas, availableReplicas) is computed from those pods.
`generation` rises only when the spec changes, so an apply that changes nothing is visible as
such.

A Pod applied directly (not by a ReplicaSet: deploy's sync pod) is Running at once, and DELETE
removes any object. Each PersistentVolumeClaim a pod mounts is a folder on this machine
(`claims`, made under `claims_root` on first use), standing in for the RWX volume.

Exec (what `kubectl exec`/`kubectl cp` and the client's kubernetes.stream use): a GET upgraded to
a websocket. The subprotocol is negotiated as the API server's wsstream handshake does: the first
of the client's offered ones that the server serves (`exec_protocols`, by default v5 and v4, as
a 1.30+ API server whose stream translator serves v5; `("v4.channel.k8s.io",)` stands in for an
older one proxying to a kubelet); none served: 403. The installed client offers v5 then v4, so
the default negotiates v5, as a current cluster does; `negotiated` records each choice. It runs
the `command` query words on THIS machine, the pod's volume mount paths rewritten to their
claims' folders, so the real tar/find/stat run on real files; frames carry channel 0 (stdin,
from the client), 1 and 2 (stdout, stderr), and 3 the exit status as the API server writes it
(Success, NonZeroExitCode with the code, or, for a command that cannot start, InternalError with
the runtime's message, as the kubelet reports an executable not found); under v5 a client's
close of channel 0 (a frame 255, 0) closes the command's stdin. It checks that stdin, stdout
and stderr are asked for as the query says and that the pod is Running; it does not emulate a
container's own file system or image: the tools are this machine's, or, with `exec_path` set
to a folder of busybox applet links, busybox's (the sync pod's image is busybox).

    PATCH/GET/DELETE  /api/v1/..., /apis/{group}/{version}/...   apply, merge patch, read, list
    GET        /api/v1/namespaces/{ns}/pods/{pod}/log      tailLines, follow (ends at once)
    GET        /api/v1/namespaces/{ns}/pods/{pod}/exec     websocket: command, stdin, stdout
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

TOKEN = "stand-in-token"
REVISION = "tuneserve.dev/revision"
RS_REVISION = "deployment.kubernetes.io/revision"
PLURALS = {
    "namespaces": "Namespace",
    "persistentvolumes": "PersistentVolume",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "secrets": "Secret",
    "services": "Service",
    "pods": "Pod",
    "deployments": "Deployment",
    "replicasets": "ReplicaSet",
    "poddisruptionbudgets": "PodDisruptionBudget",
    "horizontalpodautoscalers": "HorizontalPodAutoscaler",
    "scaledobjects": "ScaledObject",
    "ingresses": "Ingress",
    "servicemonitors": "ServiceMonitor",
    "customresourcedefinitions": "CustomResourceDefinition",
}
MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
KEDA_CRD = "scaledobjects.keda.sh"
V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"
_DISCOVERY = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)$")
_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?"
    r"(?:(?P<log>/log)|(?P<exec>/exec))?$"
)


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


@dataclass
class KubeStandIn:
    keda: bool = True
    prometheus_operator: bool = False
    custom_metrics: bool = False  # prometheus-adapter's custom.metrics.k8s.io/v1beta1
    crashing: set[str] = field(default_factory=set)  # revisions whose pods never get ready
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # by URL path
    applies: list[str] = field(default_factory=list)  # "Kind/name" per apply request
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    claims_root: Path | None = None  # where claims' folders are made
    claims: dict[str, Path] = field(default_factory=dict)  # claim name -> its folder
    execs: list[list[str]] = field(default_factory=list)  # each exec's command words
    exec_protocols: tuple[str, ...] = (V5, V4)  # the exec subprotocols served
    exec_path: str | None = (
        None  # PATH of exec'd commands (a folder of busybox applets); None: ours
    )
    negotiated: list[str] = field(default_factory=list)  # each exec's chosen subprotocol
    ready_counts: dict[str, list[int]] = field(default_factory=dict)  # by Deployment name
    # kinds the kubeconfig's user may not write (RBAC): their PATCH gets the API server's 403
    forbidden: set[str] = field(default_factory=set)
    unreadable: set[str] = field(default_factory=set)  # ... may not read: GET gets the 403

    def claim_dir(self, claim: str) -> Path:
        if claim not in self.claims:
            if self.claims_root is None:
                raise RuntimeError("set claims_root to mount claims")
            self.claims[claim] = self.claims_root / claim
            self.claims[claim].mkdir(parents=True, exist_ok=True)
        return self.claims[claim]

    # -- the store ----------------------------------------------------------------------------

    def find(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects.values() if o["kind"] == kind]

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """A Secret the user made with kubectl (the storage account key's, say)."""
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        meta = {"name": name, "namespace": namespace}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": encoded}
        with self.lock:
            self._put(f"/api/v1/namespaces/{namespace}/secrets/{name}", secret)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.find(kind) if o["metadata"]["name"] == name), None)

    def pods(self, **labels: str) -> list[dict[str, Any]]:
        pods = self.find("Pod")
        return [p for p in pods if labels.items() <= p["metadata"]["labels"].items()]

    def _put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        old = self.objects.get(path)
        meta = obj["metadata"]
        meta["generation"] = (old or {}).get("metadata", {}).get("generation", 0)
        if old is None or old.get("spec") != obj.get("spec"):
            meta["generation"] += 1
        if obj["kind"] == "Secret" and "stringData" in obj:
            data = {k: base64.b64encode(v.encode()).decode() for k, v in obj["stringData"].items()}
            obj = {k: v for k, v in obj.items() if k != "stringData"}
            obj["data"] = {**obj.get("data", {}), **data}
        self.objects[path] = obj
        return obj

    # -- the controller -----------------------------------------------------------------------

    def reconcile(self) -> None:
        for deployment in self.find("Deployment"):
            self._reconcile(deployment)

    def _reconcile(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        ns, name = meta["namespace"], meta["name"]
        template = spec["template"]
        pod_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        rs_name = f"{name}-{pod_hash}"
        sets = [r for r in self.find("ReplicaSet") if r["metadata"]["ownerName"] == name]
        top = max((int(r["metadata"]["annotations"][RS_REVISION]) for r in sets), default=0)
        current = next((r for r in sets if r["metadata"]["name"] == rs_name), None)
        if current is None:
            labels = {**template["metadata"]["labels"], "pod-template-hash": pod_hash}
            current = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": rs_name,
                    "namespace": ns,
                    "labels": labels,
                    "annotations": {RS_REVISION: str(top + 1)},
                    "ownerName": name,
                },
                "spec": {"template": merge(template, {"metadata": {"labels": labels}})},
            }
            self.objects[f"/apis/apps/v1/namespaces/{ns}/replicasets/{rs_name}"] = current
        elif int(current["metadata"]["annotations"][RS_REVISION]) < top:
            current["metadata"]["annotations"][RS_REVISION] = str(top + 1)  # rolled back to
        wanted = spec.get("replicas", 1)
        new_pods = self.pods(**{"pod-template-hash": pod_hash})
        for i in range(len(new_pods), wanted):
            self._start_pod(current, i)
        for extra in self.pods(**{"pod-template-hash": pod_hash})[wanted:]:
            self._delete(extra)
        new_pods = self.pods(**{"pod-template-hash": pod_hash})
        ready = [p for p in new_pods if _ready(p)]
        strategy = spec.get("strategy") or {}
        keeps_old = (
            strategy.get("type", "RollingUpdate") == "RollingUpdate"
            and (strategy.get("rollingUpdate") or {}).get("maxUnavailable", "25%") == 0
        )
        if len(ready) == wanted or not keeps_old:  # only then may the old pods go
            for rs in sets:
                if rs is not current:
                    old_hash = rs["metadata"]["labels"]["pod-template-hash"]
                    for pod in self.pods(**{"pod-template-hash": old_hash}):
                        self._delete(pod)
        owned = [p for p in self.find("Pod") if p["metadata"].get("ownerName") == name]
        self.ready_counts.setdefault(name, []).append(sum(_ready(p) for p in owned))
        deployment["status"] = {
            "observedGeneration": meta["generation"],
            "replicas": len(owned),
            "updatedReplicas": len(new_pods),
            "readyReplicas": sum(_ready(p) for p in owned),
            "availableReplicas": sum(_ready(p) for p in owned),
        }

    def _start_pod(self, rs: dict[str, Any], index: int) -> None:
        meta = rs["metadata"]
        template = rs["spec"]["template"]
        revision = (template["metadata"].get("annotations") or {}).get(REVISION)
        crash = revision in self.crashing
        name = f"{meta['name']}-{index}{'c' if crash else 'p'}"
        waiting = {"waiting": {"reason": "CrashLoopBackOff"}} if crash else {"running": {}}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": dict(template["metadata"]["labels"]),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerName": meta["ownerName"],
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "tuneserve",
                        "ready": not crash,
                        "restartCount": 3 * crash,
                        "state": waiting,
                    }
                ],
            },
            "log": (
                [
                    "loading the base model",
                    "Traceback (most recent call last):",
                    "tuneserve.errors.ModelLoadError: boom",
                ]
                if crash
                else ["loading the base model", f"serving {revision}"]
            ),
        }
        self.objects[f"/api/v1/namespaces/{meta['namespace']}/pods/{name}"] = pod

    def _delete(self, obj: dict[str, Any]) -> None:
        self.objects = {k: v for k, v in self.objects.items() if v is not obj}

    # -- requests -----------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, _status(401, "Unauthorized")
        url = urlparse(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if (discovery := _DISCOVERY.match(url.path)) and method == "GET":
            return self._discovery(discovery["group"], discovery["version"])
        found = _PATH.match(url.path)
        if not found:
            return 404, _status(404, f"no route {url.path}")
        group = found["group"] or ""
        if group == "keda.sh" and not self.keda:
            return 404, _status(404, "the server could not find the requested resource")
        if group == "monitoring.coreos.com" and not self.prometheus_operator:
            return 404, _status(404, "the server could not find the requested resource")
        if found["plural"] == "customresourcedefinitions" and method == "GET":
            installed = {MONITOR_CRD: self.prometheus_operator, KEDA_CRD: self.keda}
            if installed.get(found["name"] or ""):
                crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition"}
                return 200, {**crd, "metadata": {"name": found["name"]}}
            return 404, _status(404, f"customresourcedefinitions {found['name']!r} not found")
        kind = PLURALS.get(found["plural"])
        if kind is None:
            return 404, _status(404, f"no resource {found['plural']}")
        with self.lock:
            self.reconcile()
            if (method == "PATCH" and kind in self.forbidden) or (
                method == "GET" and kind in self.unreadable
            ):
                verb = "patch" if method == "PATCH" else "get"
                ns = found["ns"]
                scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
                return 403, _status(
                    403,
                    f'{found["plural"]} "{found["name"]}" is forbidden: User "stand-in" cannot '
                    f'{verb} resource "{found["plural"]}" in API group "{group}" {scope}',
                )
            if method == "GET" and found["log"]:
                return self._log(url.path.removesuffix("/log"), query)
            if method == "GET" and found["name"]:
                obj = self.objects.get(url.path)
                return (200, obj) if obj else (404, _status(404, f"{kind} not found"))
            if method == "GET":
                return 200, {"items": self._list(kind, found["ns"], query.get("labelSelector"))}
            if method == "DELETE" and found["name"]:
                gone = self.objects.pop(url.path, None)
                return (200, gone) if gone else (404, _status(404, f"{kind} not found"))
            if method == "PATCH":
                answer = self._patch(kind, found, url.path, query, headers, json.loads(body))
                self.reconcile()
                return answer
        return 405, _status(405, f"{method} not served")

    def _discovery(self, group: str, version: str) -> tuple[int, Any]:
        served = {
            ("keda.sh", "v1alpha1"): (self.keda, "scaledobjects", "ScaledObject"),
            ("monitoring.coreos.com", "v1"): (
                self.prometheus_operator,
                "servicemonitors",
                "ServiceMonitor",
            ),
            ("custom.metrics.k8s.io", "v1beta1"): (
                self.custom_metrics,
                "pods/*",
                "MetricValueList",
            ),
        }
        installed, plural, kind = served.get((group, version), (False, "", ""))
        if not installed:
            return 404, _status(404, "the server could not find the requested resource")
        resource = {"name": plural, "namespaced": True, "kind": kind, "verbs": ["get", "list"]}
        return 200, {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}",
            "resources": [resource],
        }

    def _list(self, kind: str, ns: str | None, selector: str | None) -> list[dict[str, Any]]:
        wanted = dict(part.split("=", 1) for part in (selector or "").split(",") if part)
        return [
            o
            for o in self.find(kind)
            if o["metadata"].get("namespace") == ns
            and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    def _patch(
        self, kind: str, found: Any, path: str, query: dict[str, str], headers: Any, body: Any
    ) -> tuple[int, Any]:
        content_type = headers.get("Content-Type", "")
        if content_type == "application/apply-patch+yaml":
            problems = []
            if query.get("fieldManager") != "tuneserve" or query.get("force") != "true":
                problems.append(f"apply needs fieldManager=tuneserve&force=true, got {query}")
            group_version = found["core"] or f"{found['group']}/{found['version']}"
            if (body.get("apiVersion"), body.get("kind")) != (group_version, kind):
                problems.append(f"body is {body.get('apiVersion')} {body.get('kind')}")
            meta = body.get("metadata", {})
            if meta.get("name") != found["name"] or meta.get("namespace") != found["ns"]:
                problems.append(f"body names {meta.get('namespace')}/{meta.get('name')}")
            if problems:
                return 400, _status(400, "; ".join(problems))
            self.applies.append(f"{kind}/{found['name']}")
            old = self.objects.get(path)
            applied = merge(old or {}, body)
            if old is not None and "status" in old:
                applied["status"] = old["status"]
            elif kind == "Pod":  # a bare pod (the sync pod) runs at once
                applied["status"] = {
                    "phase": "Running",
                    "containerStatuses": [
                        {"name": "sync", "ready": True, "state": {"running": {}}}
                    ],
                }
                applied["log"] = []
            return 200, self._put(path, applied)
        if content_type == "application/merge-patch+json":
            old = self.objects.get(path)
            if old is None:
                return 404, _status(404, f"{kind} {found['name']} not found")
            return 200, self._put(path, merge(old, body))
        if content_type == "application/json-patch+json":
            old = self.objects.get(path)
            if old is None:
                return 404, _status(404, f"{kind} {found['name']} not found")
            if [op.get("op") for op in body] != ["replace"] or body[0]["path"] != "/spec/template":
                return 422, _status(422, f"the stand-in replaces /spec/template only: {body}")
            replaced = copy.deepcopy(old)
            replaced["spec"]["template"] = body[0]["value"]
            return 200, self._put(path, replaced)
        return 415, _status(415, f"unsupported patch type {content_type!r}")

    def exec_plan(self, raw_path: str) -> tuple[list[str], bool, str | None]:
        """(argv to run here, whether stdin is wanted, or None and why not) for an exec URL."""
        url = urlparse(raw_path)
        query = parse_qs(url.query)
        with self.lock:
            pod = self.objects.get(url.path.removesuffix("/exec"))
            if pod is None or pod.get("status", {}).get("phase") != "Running":
                return [], False, "pod not found or not running"
            mounts = {
                v["name"]: self.claim_dir(v["persistentVolumeClaim"]["claimName"])
                for v in pod["spec"].get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            paths = {
                m["mountPath"]: mounts[m["name"]]
                for m in pod["spec"]["containers"][0].get("volumeMounts", [])
                if m["name"] in mounts
            }
        argv = query.get("command", [])
        if query.get("stdout") != ["true"] or query.get("stderr") != ["true"]:
            return [], False, f"stdout and stderr not both asked for: {query}"
        self.execs.append(list(argv))
        rewritten = []
        for word in argv:
            for mount, folder in paths.items():
                word = word.replace(mount, str(folder))
            rewritten.append(word)
        return rewritten, query.get("stdin") == ["true"], None

    def _log(self, pod_path: str, query: dict[str, str]) -> tuple[int, Any]:
        pod = self.objects.get(pod_path)
        if pod is None:
            return 404, _status(404, "pod not found")
        lines = pod["log"][-int(query.get("tailLines", "1000")) :]
        return 200, "".join(line + "\n" for line in lines)


def _ready(pod: dict[str, Any]) -> bool:
    return all(c["ready"] for c in pod["status"]["containerStatuses"])


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "code": code,
    }


class _Handler(BaseHTTPRequestHandler):
    standin: KubeStandIn

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, answer = self.standin.handle(self.command, self.path, self.headers, body)
        text = answer if isinstance(answer, str) else json.dumps(answer)
        kind = "text/plain" if isinstance(answer, str) else "application/json"
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.headers.get("Upgrade", "").lower() != "websocket":
            self._serve()
            return
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        argv, wants_stdin, refused = self.standin.exec_plan(self.path)
        if refused:
            self.send_error(400, refused)
            return
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        # wsstream's handshake: the client's order, the first one served
        chosen = next((p for p in offered if p in self.standin.exec_protocols), None)
        if chosen is None:
            self.send_error(403, f"requested protocol(s) are not supported: {offered}")
            return
        self.standin.negotiated.append(chosen)
        accept = base64.b64encode(
            hashlib.sha1((self.headers["Sec-WebSocket-Key"] + _WS_GUID).encode()).digest()
        ).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", chosen)
        self.end_headers()
        self.wfile.flush()
        env = None if self.standin.exec_path is None else {"PATH": self.standin.exec_path}
        _run_exec(self.rfile, self.wfile, argv, wants_stdin, v5=chosen == V5, env=env)
        self.close_connection = True

    do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _send_frame(out: Any, payload: bytes, opcode: int = 2) -> None:
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    out.write(head + payload)
    out.flush()


def _read_frame(inp: Any) -> tuple[int, bytes] | None:
    """One client frame (masked, as clients must send them), or None at the end."""
    head = inp.read(2)
    if len(head) < 2:
        return None
    opcode, n = head[0] & 0x0F, head[1] & 0x7F
    if n == 126:
        n = int.from_bytes(inp.read(2), "big")
    elif n == 127:
        n = int.from_bytes(inp.read(8), "big")
    mask = inp.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = inp.read(n)
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _run_exec(
    inp: Any, out: Any, argv: list[str], wants_stdin: bool, *, v5: bool, env: Any = None
) -> None:
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if wants_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    except OSError as exc:  # the kubelet's answer when the runtime cannot start the command
        why = (
            f"error executing command in container: failed to exec in container: exec: "
            f"{argv[0] if argv else ''!r}: {exc.strerror}"
        )
        failure = {
            "metadata": {},
            "status": "Failure",
            "message": f"Internal error occurred: {why}",
            "reason": "InternalError",
            "details": {"causes": [{"message": why}]},
            "code": 500,
        }
        _send_frame(out, b"\3" + json.dumps(failure).encode())
        _send_frame(out, b"\x03\xe8", opcode=8)
        return
    send_lock = threading.Lock()

    def pump(stream: Any, channel: int) -> None:
        while data := stream.read1(65536):
            with send_lock:
                _send_frame(out, bytes([channel]) + data)

    def feed() -> None:
        assert proc.stdin is not None
        try:
            while (frame := _read_frame(inp)) is not None and frame[0] != 8:
                if frame[0] in (1, 2) and frame[1][:1] == b"\0":
                    proc.stdin.write(frame[1][1:])
                    proc.stdin.flush()
                elif v5 and frame[0] in (1, 2) and frame[1][:2] == b"\xff\0":
                    proc.stdin.close()  # v5's close of stdin: the command reads its end
        except (BrokenPipeError, ValueError, OSError):
            pass  # the command stopped reading (head -c N read its bytes)

    pumps = [
        threading.Thread(target=pump, args=(s, c)) for s, c in ((proc.stdout, 1), (proc.stderr, 2))
    ]
    for t in pumps:
        t.start()
    if wants_stdin:
        threading.Thread(target=feed, daemon=True).start()
    code = proc.wait()
    for t in pumps:
        t.join()
    status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    if code:
        status = {
            "metadata": {},
            "status": "Failure",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    with send_lock:
        _send_frame(out, b"\3" + json.dumps(status).encode())
        _send_frame(out, b"\x03\xe8", opcode=8)


def kubeconfig(url: str, context: str = "stand-in") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": TOKEN}}],
        "contexts": [{"name": context, "context": {"cluster": "loopback", "user": "tester"}}],
        "current-context": context,
    }


@contextlib.contextmanager
def serve(standin: KubeStandIn) -> Iterator[KubeStandIn]:
    handler = type("Handler", (_Handler,), {"standin": standin})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
