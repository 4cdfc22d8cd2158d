"""The local provider with a stand-in server (tests/deploy/fake_server.py): the deploy cycle,
atomic switch, failure keeping the old revision, logs, status and stop, in a few seconds."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tuneserve.deploy.http import get_json
from tuneserve.deploy.infra import InfraPaths, load_config
from tuneserve.deploy.local import LocalProvider, localize_commands
from tuneserve.deploy.processes import pid_alive


def _state(ws: Path) -> dict[str, Any]:
    paths = InfraPaths(ws)
    provider = LocalProvider(paths, load_config(paths.config))
    return json.loads((provider.app_dir / "state.json").read_text())


def test_deploy_cycle_switches_atomically_and_keeps_old_revision_on_failure(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    ws = fake_workspace(max_instances=2)
    endpoint = cli("endpoint", "-w", ws).stdout.strip().splitlines()[-1]
    assert endpoint.startswith("http://127.0.0.1:")

    # first deploy: two replicas behind the endpoint
    result = cli("deploy", "-w", ws, "--replicas", "2", "--timeout", "30")
    assert result.stdout.strip().splitlines()[-1] == endpoint
    first = _state(ws)
    assert len(first["replicas"]) == 2
    answers = {get_json(endpoint + "/answer")["pid"] for _ in range(4)}
    assert answers == {r["pid"] for r in first["replicas"]}  # round-robin over both
    assert get_json(endpoint + "/health")["revision"] == first["revision"]

    status = cli("status", "-w", ws).stdout
    assert "ready: yes" in status and "adapters: alpha" in status

    # a code change is served after deploy, by a new revision; the old replicas are gone
    (ws / "answer.txt").write_text("two\n")
    result = cli("deploy", "-w", ws, "--timeout", "30")
    uploaded = int(re.search(r"(\d+) file\(s\) uploaded", result.stderr).group(1))  # type: ignore[union-attr]
    assert 1 <= uploaded < 10  # answer.txt (+ build files if tuneserve's source changed)
    second = _state(ws)
    assert second["revision"] != first["revision"]
    assert get_json(endpoint + "/answer")["answer"] == "two"
    assert get_json(endpoint + "/health")["revision"] == second["revision"]
    assert not any(pid_alive(r["pid"]) for r in first["replicas"])

    # a broken revision: deploy fails clearly and the previous one goes on serving
    (ws / "FAIL").write_text("x")
    result = cli("deploy", "-w", ws, "--timeout", "30", ok=False)
    assert "did not become ready" in result.stderr
    assert "refusing to start" in result.stderr  # the replica's last log lines
    assert f"previous revision {second['revision']} is still serving" in result.stderr
    assert get_json(endpoint + "/health")["revision"] == second["revision"]
    assert get_json(endpoint + "/answer")["answer"] == "two"
    failed = _state(ws)["last_failed"]
    logs = cli("logs", "-w", ws, "--revision", failed).stdout
    assert "refusing to start" in logs

    # fixed again: the file deploy uploaded before and the workspace dropped leaves the share
    (ws / "FAIL").unlink()
    cli("deploy", "-w", ws, "--timeout", "30")
    assert get_json(endpoint + "/answer")["answer"] == "two"

    out = cli("stop", "-w", ws).stdout
    assert "Stopped" in out
    assert get_json(endpoint + "/health") is None
    assert not any(pid_alive(r["pid"]) for r in _state(ws)["replicas"] + second["replicas"])


def test_readiness_timeout_fails_and_stops_new_replicas(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    ws = fake_workspace(ready_after=60)
    result = cli("deploy", "-w", ws, "--timeout", "2", ok=False)
    assert "not ready after 2 s" in result.stderr
    assert "No previous revision is serving" in result.stderr
    state = _state(ws)
    assert state["pending"] == [] and state["revision"] is None


def test_replicas_are_capped_by_maximum_instance_count(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    ws = fake_workspace(max_instances=1)
    result = cli("deploy", "-w", ws, "--replicas", "2", ok=False)
    assert "more than maximumInstanceCount (1)" in result.stderr


def test_endpoint_port_taken_is_a_clear_error(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    ws = fake_workspace()
    port = int(load_config(ws / "infra" / "inference.config.json").endpoint_url.rsplit(":", 1)[1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        result = cli("deploy", "-w", ws, ok=False)
    assert f"port {port} is taken" in result.stderr


def test_hand_filled_config_without_provision(
    tmp_path: Path, cli: Callable[..., Any], started_workspaces: list[Path]
) -> None:
    from tests.deploy.conftest import FAKE_SERVER, set_parameters

    ws = tmp_path / "manual"
    cli("init", ws)
    (ws / "fake_server.py").write_text(FAKE_SERVER.read_text())
    (ws / "answer.txt").write_text("manual\n")
    set_parameters(ws, defaultCommands=["cd /mount", "exec python fake_server.py --port 7860"])
    config = {
        "SUBSCRIPTION_ID": "local",
        "RESOURCE_GROUP_NAME": "mine",
        "STORAGE_ACCOUNT_NAME": str(tmp_path / "elsewhere"),
        "FILE_SHARE_NAME": "myshare",
        "ACA_APP_NAME": "myapp",
        "ACA_APP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "PROVIDER": "local",
    }
    (ws / "infra" / "inference.config.json").write_text(json.dumps(config))
    started_workspaces.append(ws)
    endpoint = cli("deploy", "-w", ws, "--timeout", "30").stdout.strip().splitlines()[-1]
    assert get_json(endpoint + "/answer")["answer"] == "manual"
    assert (tmp_path / "elsewhere" / "myshare" / "answer.txt").exists()


def test_commands_run_as_in_the_container(tmp_path: Path) -> None:
    script = localize_commands(
        [
            "cd /mount",
            "pip install /mount/.tuneserve-build",
            "exec tuneserve serve --workspace /mount --host 0.0.0.0 --port 7860",
            "ls /mountain",
        ],
        tmp_path / "mount",
        5555,
    )
    assert script == (
        f"cd {tmp_path}/mount; pip install {tmp_path}/mount/.tuneserve-build; "
        f"exec tuneserve serve --workspace {tmp_path}/mount --host 127.0.0.1 --port 5555; "
        "ls /mountain"
    )


def test_status_before_any_deploy(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    ws = fake_workspace()
    result = cli("status", "-w", ws)
    assert "revision: (none)" in result.stdout
    assert "proxy is not running" in result.stderr
    assert os.path.exists(ws / ".tuneserve" / "storage")


def _next_within(lines: Any, seconds: float) -> str:
    """next(lines), failing (not hanging) when no line comes in time."""
    box: list[str] = []
    thread = threading.Thread(target=lambda: box.append(next(lines)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"no log line within {seconds} s"
    return box[0]


def test_logs_follow_yields_new_lines(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    ws = fake_workspace()
    cli("deploy", "-w", ws, "--timeout", "30")
    paths = InfraPaths(ws)
    provider = LocalProvider(paths, load_config(paths.config))
    lines = provider.logs(tail=1, follow=True)
    assert "fake server" in _next_within(lines, 10)
    log = provider.log_files()[0]
    with log.open("a") as fh:
        fh.write("appended line\n")
    assert _next_within(lines, 10) == "appended line"
    assert "listening" in cli("logs", "-w", ws, "--tail", "5").stdout
