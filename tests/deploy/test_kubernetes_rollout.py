"""A rollout read from the Deployment's status and its new pods (deploy/k8s/rollout.py), on the
wire shapes a real API server returns; pure functions, no cluster and no stand-in."""

from __future__ import annotations

from typing import Any

from tuneserve.deploy.k8s.rollout import progress


def deployment(**status: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "generation": 2},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 2, **status},
    }


def pod(name: str, *, ready: bool, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {"containerStatuses": [{"name": "tuneserve", "ready": ready}], **status},
    }


def test_a_new_pod_loading_beside_the_old_one_is_said_so_not_old_ones_terminating() -> None:
    """kubectl's wording there is "old replicas are pending termination": they are kept."""
    loading = pod("chat-new-1", ready=False)
    loading["status"]["containerStatuses"][0]["state"] = {"running": {}}
    state = progress(deployment(replicas=2, updatedReplicas=1, availableReplicas=1), [loading])
    assert (state.done, state.failed) == (False, None)
    assert state.message == "0 of 1 new pods ready; 1 old kept"


def test_a_surge_pod_without_a_free_gpu_says_what_the_scheduler_says() -> None:
    """maxSurge 1 needs one GPU more than the replicas hold: the wait goes on (a node may come)
    and the progress line says why."""
    pending = pod(
        "chat-new-1",
        ready=False,
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    pending["status"]["containerStatuses"] = []
    state = progress(deployment(replicas=2, updatedReplicas=1, availableReplicas=1), [pending])
    assert (state.done, state.failed) == (False, None)
    assert "pod chat-new-1: Unschedulable: 0/2 nodes are available" in state.message
    assert "Insufficient nvidia.com/gpu" in state.message


def test_stuck_and_done() -> None:
    crashing = pod("chat-new-1", ready=False)
    crashing["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "CrashLoopBackOff"}
    }
    failed = progress(deployment(replicas=2, updatedReplicas=1, availableReplicas=1), [crashing])
    assert failed.failed == "pod chat-new-1 is in CrashLoopBackOff"
    done = progress(
        deployment(replicas=1, updatedReplicas=1, availableReplicas=1),
        [pod("chat-new-1", ready=True)],
    )
    assert done.done and done.message == "1 pod(s) ready"
    deadline = deployment(replicas=2, updatedReplicas=1, availableReplicas=1)
    deadline["status"]["conditions"] = [
        {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
    ]
    assert progress(deadline, []).failed == "progress deadline exceeded: too slow"
