"""A Deployment's rollout read the way `kubectl rollout status` reads it, and undone the way
`kubectl rollout undo` does (the previous ReplicaSet's pod template put back), over KubeApi.

A deploy changes one thing, the pod template's revision annotation: the Deployment controller
then starts a new ReplicaSet beside the old one and, with maxUnavailable 0, removes old pods only
as new ones become available. Undoing before that happens leaves the old pods serving untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuneserve.deploy.k8s.api import KubeApi
from tuneserve.deploy.k8s.manifests import REVISION_ANNOTATION

RS_REVISION = "deployment.kubernetes.io/revision"  # the controller's count on each ReplicaSet
# container states a pod does not leave by waiting longer
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def template_revision(obj: dict[str, Any]) -> str | None:
    """The revision annotation of a Deployment's or ReplicaSet's pod template."""
    meta = obj.get("spec", {}).get("template", {}).get("metadata", {})
    value = (meta.get("annotations") or {}).get(REVISION_ANNOTATION)
    return str(value) if value else None


def next_revision(app: str, current: str | None) -> str:
    found = re.search(r"--r(\d+)$", current or "")
    return f"{app}--r{int(found.group(1)) + 1 if found else 1}"


@dataclass(frozen=True)
class Progress:
    done: bool
    failed: str | None  # why the rollout cannot succeed
    message: str


def progress(deployment: dict[str, Any], new_pods: list[dict[str, Any]]) -> Progress:
    """Where a rollout stands: kubectl's completeness rules, plus new pods stuck for good."""
    spec, status = deployment["spec"], deployment.get("status", {})
    for condition in status.get("conditions", []):
        if condition.get("type") == "Progressing" and condition.get("reason") == (
            "ProgressDeadlineExceeded"
        ):
            return Progress(False, f"progress deadline exceeded: {condition.get('message')}", "")
    for pod in new_pods:
        for state in pod.get("status", {}).get("containerStatuses", []):
            reason = (state.get("state", {}).get("waiting") or {}).get("reason")
            if reason in STUCK_REASONS:
                return Progress(False, f"pod {pod['metadata']['name']} is in {reason}", "")
        if pod.get("status", {}).get("phase") == "Failed":
            return Progress(False, f"pod {pod['metadata']['name']} failed", "")
    if deployment["metadata"].get("generation", 0) > status.get("observedGeneration", 0):
        return Progress(False, None, "waiting for the controller to see the new template")
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    waiting_on = _waiting_on(new_pods)
    if updated < wanted:
        return Progress(False, None, f"{updated} of {wanted} new pods updated{waiting_on}")
    if status.get("replicas", 0) > updated:
        old = status["replicas"] - updated
        ready = sum(pod_ready(p) for p in new_pods)
        if ready < updated:
            # kubectl says "old replicas are pending termination" here: they are kept, serving,
            # until the new pods are ready (maxUnavailable 0)
            return Progress(
                False, None, f"{ready} of {updated} new pods ready{waiting_on}; {old} old kept"
            )
        return Progress(False, None, f"{old} old pod(s) still terminating")
    available = status.get("availableReplicas", 0)
    if available < updated:
        return Progress(False, None, f"{available} of {updated} new pods ready{waiting_on}")
    return Progress(True, None, f"{available} pod(s) ready")


def pod_ready(pod: dict[str, Any]) -> bool:
    """Every container of the pod reports ready."""
    statuses = pod.get("status", {}).get("containerStatuses", [])
    return bool(statuses) and all(c.get("ready") for c in statuses)


def _waiting_on(new_pods: list[dict[str, Any]]) -> str:
    """What the first new pod not ready waits for, where it says: the scheduler's reason (a
    surge pod with no free GPU is Unschedulable until a node has one), else its container's."""
    for pod in new_pods:
        if pod_ready(pod):
            continue
        name = pod["metadata"]["name"]
        for condition in pod.get("status", {}).get("conditions", []):
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                why = condition.get("message") or condition.get("reason") or "not scheduled"
                return f" (pod {name}: {condition.get('reason', 'Unschedulable')}: {why[:160]})"
        for state in pod.get("status", {}).get("containerStatuses", []):
            reason = (state.get("state", {}).get("waiting") or {}).get("reason")
            if reason:
                return f" (pod {name}: {reason})"
        return ""
    return ""


def replica_sets(api: KubeApi, selector: dict[str, str]) -> list[dict[str, Any]]:
    """The Deployment's ReplicaSets, newest revision first."""
    sets = api.select("ReplicaSet", selector)
    return sorted(
        sets,
        key=lambda rs: int(rs["metadata"].get("annotations", {}).get(RS_REVISION, 0)),
        reverse=True,
    )


def pods_of(api: KubeApi, selector: dict[str, str], revision: str) -> list[dict[str, Any]]:
    """The pods of the ReplicaSet whose template carries `revision`."""
    for rs in replica_sets(api, selector):
        if template_revision(rs) == revision:
            pod_hash = rs["metadata"]["labels"].get("pod-template-hash")
            return api.select("Pod", {**selector, "pod-template-hash": pod_hash})
    return []


def undo(api: KubeApi, name: str, selector: dict[str, str], failed: str) -> str | None:
    """Put back the newest ReplicaSet's template that is not the failed revision's (as
    `kubectl rollout undo`); returns its revision, or None when there is none to go back to."""
    for rs in replica_sets(api, selector):
        if template_revision(rs) == failed:
            continue
        template = rs["spec"]["template"]
        labels = {
            k: v
            for k, v in template["metadata"].get("labels", {}).items()
            if k != "pod-template-hash"
        }
        template = {**template, "metadata": {**template["metadata"], "labels": labels}}
        api.json_patch(
            "Deployment", name, [{"op": "replace", "path": "/spec/template", "value": template}]
        )
        return template_revision(rs) or "(unnamed)"
    return None
