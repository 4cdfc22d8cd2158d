"""Deploy to a storage class's volume: the workspace goes through a short-lived pod mounting the
claim, by commands exec'd over the client's websocket (kubernetes.stream) and tar streams, as
`kubectl cp` does. The cluster is tests/deploy/kube_standin.py: its exec runs the commands with
this machine's /bin/sh on a folder standing in for the claim (its docstring says what it
emulates); a real API server, kubelet and RWX volume are not exercised here.

The installed client offers the exec subprotocols v5.channel.k8s.io then v4.channel.k8s.io; the
stand-in negotiates as the API server does (the first offered that it serves), so v5 by default
(a 1.30+ API server) and v4 where it serves only that (an older one): the sync runs under both."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import kube_standin
from tests.deploy.kube_standin import REVISION, V4, V5, KubeStandIn
from tests.deploy.test_adapters_local import adapters
from tuneserve.deploy.infra import load_config
from tuneserve.deploy.k8s.api import exit_status
from tuneserve.deploy.k8s.podshare import PodShareTarget, tar_stream
from tuneserve.deploy.k8s.provider import KubernetesProvider
from tuneserve.deploy.scaffold import init_workspace

NS = "ml"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[KubeStandIn]:
    with kube_standin.serve(KubeStandIn(claims_root=tmp_path / "claims")) as standin:
        config = tmp_path / "kubeconfig"
        config.write_text(yaml.safe_dump(kube_standin.kubeconfig(standin.url)))
        monkeypatch.setenv("KUBECONFIG", str(config))
        monkeypatch.setattr(KubernetesProvider, "poll_s", 0.02)
        yield standin


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    init_workspace(ws)
    adapter = ws / "models" / "tone"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}\n')
    (adapter / "weights with space.bin").write_bytes(os.urandom(700_000))  # > one chunk of tar
    return ws


def provision_on_storage_class(cli: Callable[..., Any], workspace: Path) -> None:
    """Provision on the stand-in with the share on an RWX storage class (synced by pod)."""
    cli(
        "provision",
        "-w",
        workspace,
        "--provider",
        "kubernetes",
        "--namespace",
        NS,
        "--storage-class",
        "nfs-rwx",
    )


@pytest.mark.parametrize(
    "served",
    [pytest.param((V5, V4), id="v5-api-server"), pytest.param((V4,), id="v4-only-api-server")],
)
def test_deploy_syncs_through_a_pod_on_the_claim_and_deletes_it(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn, served: tuple[str, ...]
) -> None:
    cluster.exec_protocols = served
    provision_on_storage_class(cli, workspace)
    config = load_config(workspace / "infra" / "inference.config.json")
    app, claim = str(config.ACA_APP_NAME), str(config.FILE_SHARE_NAME)

    first = cli("deploy", "-w", workspace)
    assert f"claim {claim} (through pod {app}-sync)" in first.output
    assert f"Deployed revision {app}--r1" in first.output
    share = cluster.claims[claim]
    weights = "models/tone/weights with space.bin"
    assert (share / weights).read_bytes() == (workspace / weights).read_bytes()
    assert (share / "models/tone/adapter_config.json").read_text() == '{"r": 8}\n'
    assert not [p for p in share.rglob(".*.part")]  # every upload renamed into place
    assert any("tar xf -" in " ".join(words) for words in cluster.execs)
    assert cluster.get("Pod", f"{app}-sync") is None  # the sync pod is gone
    assert [p["metadata"]["annotations"][REVISION] for p in cluster.pods()] == [f"{app}--r1"]
    # every exec negotiated the server's first choice among the client's offer
    assert set(cluster.negotiated) == {served[0]}

    # a second deploy uploads only what changed
    (workspace / "models" / "tone" / "adapter_config.json").write_text('{"r": 16}\n')
    before = len(cluster.execs)
    again = cli("deploy", "-w", workspace)
    assert f"Deployed revision {app}--r2" in again.output
    assert (share / "models/tone/adapter_config.json").read_text() == '{"r": 16}\n'
    uploads = [w for w in cluster.execs[before:] if "tar xf -" in " ".join(w)]
    assert any("adapter_config.json" in " ".join(w) for w in uploads)
    assert not any("weights with space.bin" in " ".join(w) for w in uploads)
    assert cluster.get("Pod", f"{app}-sync") is None


# the applets podshare's commands call (sh's own builtins aside)
BUSYBOX_APPLETS = ("sh", "find", "stat", "tar", "head", "mv", "mkdir", "rm", "sha256sum", "cat")
BUSYBOX = os.environ.get("TUNESERVE_TEST_BUSYBOX") or shutil.which("busybox")


@pytest.mark.skipif(
    not BUSYBOX, reason="no busybox here (set TUNESERVE_TEST_BUSYBOX to a busybox binary)"
)
def test_the_sync_commands_run_on_busybox(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn, tmp_path: Path
) -> None:
    """The sync pod's image is busybox: the same deploy and adapter push/remove with only
    busybox's applets on PATH (its sh, find -exec +, stat -c, head -c, tar x of PAX headers for
    a long and a non-ASCII name, sha256sum). A busybox build on this machine, not the image's."""
    applets = tmp_path / "busybox-bin"
    applets.mkdir()
    for name in BUSYBOX_APPLETS + ("rmdir",):
        (applets / name).symlink_to(str(BUSYBOX))
    cluster.exec_path = str(applets)
    deep = "models/tone/" + "/".join(["a-rather-long-folder-name"] * 5) + "/weights é.bin"
    assert len(deep.encode()) > 100  # a PAX path header, not ustar's name field
    (workspace / deep).parent.mkdir(parents=True)
    (workspace / deep).write_bytes(os.urandom(3000))
    provision_on_storage_class(cli, workspace)
    config = load_config(workspace / "infra" / "inference.config.json")
    claim = str(config.FILE_SHARE_NAME)
    cli("deploy", "-w", workspace)
    share = cluster.claims[claim]
    for rel in (deep, "models/tone/weights with space.bin", "models/tone/adapter_config.json"):
        assert (share / rel).read_bytes() == (workspace / rel).read_bytes(), rel
    assert not [p for p in share.rglob(".*.part")]
    (workspace / "models" / "tone" / "adapter_config.json").write_text('{"r": 16}\n')
    cli("deploy", "-w", workspace)
    assert (share / "models/tone/adapter_config.json").read_text() == '{"r": 16}\n'

    adapter = tmp_path / "support"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 8000)
    adapters("push", "support", adapter, "-w", workspace)
    assert (share / "models/support/adapter_model.safetensors").stat().st_size == 8000
    adapters("remove", "support", "-w", workspace)
    assert not (share / "models/support").exists()


def test_a_failing_command_names_the_claim_and_the_pod_is_still_deleted(
    workspace: Path, cluster: KubeStandIn, tmp_path: Path
) -> None:
    from tuneserve.deploy.k8s.provider import kube_api

    api = kube_api("stand-in", NS)
    target = PodShareTarget(api, "app-sync", "app-share", {"app.kubernetes.io/name": "tuneserve"})
    with pytest.raises(Exception, match="claim 'app-share'.*exited 1"):
        with target.opened(timeout=5):
            target.rename_dir("missing", "elsewhere")
    assert cluster.get("Pod", "app-sync") is None


def test_a_command_that_cannot_start_comes_back_as_its_status_message(
    workspace: Path, cluster: KubeStandIn
) -> None:
    """A real API server answers an executable not found with an InternalError Status on
    channel 3 (no exit code): exec_in gives -1 and the message, not a parse error."""
    from tuneserve.deploy.k8s.provider import kube_api

    api = kube_api("stand-in", NS)
    target = PodShareTarget(api, "app-sync", "app-share", {"app.kubernetes.io/name": "tuneserve"})
    with target.opened(timeout=5):
        result = api.exec_in("app-sync", ["no-such-tool-here"])
        ok = api.exec_in("app-sync", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert result.code == -1
    assert b"error executing command in container" in result.stderr
    assert (ok.code, ok.stdout, ok.stderr) == (7, b"out\n", b"err\n")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param('{"metadata":{},"status":"Success"}', (0, ""), id="success"),
        pytest.param(
            '{"metadata":{},"status":"Failure","reason":"NonZeroExitCode",'
            '"details":{"causes":[{"reason":"ExitCode","message":"3"}]}}',
            (3, ""),
            id="exit-code",
        ),
        pytest.param(
            '{"status":"Failure","reason":"InternalError","message":"Internal error occurred: '
            'exec: no such file","details":{"causes":[{"message":"exec: no such file"}]}}',
            (-1, "Internal error occurred: exec: no such file"),
            id="internal-error",
        ),
        pytest.param(
            "", (-1, "the exec stream ended without the command's exit status"), id="none"
        ),
    ],
)
def test_exit_status_reads_the_api_servers_status(status: str, expected: tuple[int, str]) -> None:
    assert exit_status(status.encode()) == expected


def test_the_client_negotiates_v5_and_its_stdin_close_reaches_the_command(
    workspace: Path, cluster: KubeStandIn
) -> None:
    """What the installed client offers and makes of the answer, seen from the client: v5 is
    chosen, and its close of stdin (which v4 lacks, hence `head -c N` in podshare) ends `cat`."""
    from kubernetes import client as kube_client
    from kubernetes.stream import stream

    from tuneserve.deploy.k8s.provider import kube_api

    api = kube_api("stand-in", NS)
    target = PodShareTarget(api, "app-sync", "app-share", {"app.kubernetes.io/name": "tuneserve"})
    with target.opened(timeout=5):
        ws = stream(
            kube_client.CoreV1Api(api.client).connect_get_namespaced_pod_exec,
            "app-sync",
            NS,
            command=["cat"],
            stdin=True,
            stdout=True,
            stderr=True,
            tty=False,
            binary=True,
            _preload_content=False,
        )
        try:
            assert ws.subprotocol == V5
            ws.write_stdin(b"through v5")
            ws.close_channel(0)
            ws.run_forever(timeout=10)
            assert ws.read_stdout() == b"through v5" and ws.returncode == 0
        finally:
            ws.close()
    assert cluster.negotiated == [V5]


def test_the_tar_stream_is_a_valid_archive(tmp_path: Path) -> None:
    import io
    import tarfile

    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1234)
    sent: list[int] = []
    size, chunks = tar_stream(src, "a/.f.bin.part", sent.append)
    data = b"".join(chunks)
    assert len(data) == size and sum(sent) == 1234
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        [member] = tar.getmembers()
        assert member.name == "a/.f.bin.part" and member.size == 1234


def test_logs_follow_every_pod_each_line_prefixed(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn
) -> None:
    provision_on_storage_class(cli, workspace)
    cli("deploy", "-w", workspace, "--replicas", "2")
    pods = sorted(p["metadata"]["name"] for p in cluster.pods())
    assert len(pods) == 2
    logs = {p["metadata"]["name"]: p["log"] for p in cluster.pods()}
    # the stand-in's follow ends with the log: each pod's stream is read to its end
    followed = cli("logs", "-w", workspace, "--follow", "--tail", "5").stdout.splitlines()
    assert sorted(followed) == sorted(f"[{pod}] {line}" for pod in pods for line in logs[pod])
    for pod in pods:  # each pod's lines keep their order
        mine = [line for line in followed if line.startswith(f"[{pod}] ")]
        assert mine == [f"[{pod}] {line}" for line in logs[pod]]


def test_adapters_push_reaches_the_claim_and_says_the_pods_rescan(
    cli: Callable[..., Any], workspace: Path, cluster: KubeStandIn, tmp_path: Path
) -> None:
    """The Service (http://APP.NS.svc.cluster.local) is not reachable from here, as from a
    laptop outside the cluster: the adapter lands on the claim and the note says so."""
    provision_on_storage_class(cli, workspace)
    config = load_config(workspace / "infra" / "inference.config.json")
    adapter = tmp_path / "support"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 8000)
    pushed = adapters("push", "support", adapter, "-w", workspace)
    share = cluster.claims[str(config.FILE_SHARE_NAME)]
    assert (share / "models/support/adapter_model.safetensors").stat().st_size == 8000
    assert "not reachable from here" in pushed.output
    assert "next rescan" in pushed.output and "port-forward" in pushed.output
    assert cluster.get("Pod", f"{config.ACA_APP_NAME}-sync") is None

    removed = adapters("remove", "support", "-w", workspace)
    assert "support" in removed.output
    assert not (share / "models/support").exists()
