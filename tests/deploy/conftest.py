"""Fixtures for the deploy tests: a CLI runner on the deploy commands, local workspaces whose
replicas are always stopped at the end (even when a test fails)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import free_port

FAKE_SERVER = Path(__file__).with_name("fake_server.py")


@pytest.fixture(scope="session")
def deploy_app() -> typer.Typer:
    from tuneserve.cli.deploy import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


@pytest.fixture
def cli(deploy_app: typer.Typer) -> Callable[..., Any]:
    """cli("deploy", "-w", ws, ok=True) -> click Result; asserts the exit code when ok is set."""
    runner = CliRunner()

    def run(*args: Any, ok: bool | None = True, input: str | None = None) -> Any:
        result = runner.invoke(deploy_app, [str(a) for a in args], input=input)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        if ok is True:
            assert result.exit_code == 0, result.output
        elif ok is False:
            assert result.exit_code != 0, result.output
        return result

    return run


@pytest.fixture
def started_workspaces() -> Iterator[list[Path]]:
    """Workspaces whose local replicas and proxy are stopped at teardown, whatever happened."""
    started: list[Path] = []
    yield started
    from tuneserve.deploy.infra import InfraPaths, load_config
    from tuneserve.deploy.local import LocalProvider

    for ws in started:
        paths = InfraPaths(ws)
        if paths.config.exists():
            try:
                LocalProvider(paths, load_config(paths.config)).stop()
            except Exception as exc:  # keep stopping the others
                print(f"teardown: stopping {ws} failed: {exc}")


def set_parameters(ws: Path, **values: Any) -> None:
    path = ws / "infra" / "provision" / "inference.parameters.json"
    data = json.loads(path.read_text())
    for key, value in values.items():
        data["parameters"][key] = {"value": value}
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture
def fake_workspace(
    tmp_path: Path, cli: Callable[..., Any], started_workspaces: list[Path]
) -> Callable[..., Path]:
    """An initialised, locally provisioned workspace running fake_server.py instead of the model."""

    def make(*, max_instances: int = 2, ready_after: float = 0.0) -> Path:
        ws = tmp_path / "ws"
        cli("init", ws)
        shutil.copy(FAKE_SERVER, ws / "fake_server.py")
        (ws / "answer.txt").write_text("one\n")
        (ws / "models" / "alpha").mkdir(parents=True)
        (ws / "models" / "alpha" / "adapter_config.json").write_text("{}")
        set_parameters(
            ws,
            defaultCommands=[
                "cd /mount",
                f"exec python /mount/fake_server.py --host 0.0.0.0 --port 7860 "
                f"--ready-after {ready_after}",
            ],
            maximumInstanceCount=max_instances,
        )
        started_workspaces.append(ws)
        cli("provision", "-w", ws, "--provider", "local", "--port", free_port())
        return ws

    return make


@pytest.fixture
def toy_deployment(
    tmp_path: Path,
    demo_cache: Path,
    demo_paths: Any,
    cli: Callable[..., Any],
    started_workspaces: list[Path],
) -> Callable[[], tuple[Path, str, str]]:
    """deploy() -> (workspace, endpoint, API key): `init --demo --toy`, `provision --provider
    local`, `deploy`, as a user runs them; the replicas are stopped at teardown."""

    def deploy() -> tuple[Path, str, str]:
        ws = tmp_path / "project"
        cli("init", ws, "--demo", "--toy", "--cache-dir", demo_cache)
        started_workspaces.append(ws)
        cli("provision", "-w", ws, "--provider", "local", "--port", free_port())
        # the first deploy also uploads the (small) base model
        endpoint = cli("deploy", "-w", ws, "--timeout", "180").stdout.strip().splitlines()[-1]
        key = cli("endpoint", "-w", ws, "--show-key").stdout.strip()
        return ws, endpoint, key

    return deploy
