"""The endpoint's keys: made by provision, shown once, kept 0600 in .tuneserve/keys.json, handed
to the replicas as the platform's secrets, read back by the commands that call the endpoint."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tuneserve.deploy.http import get_json
from tuneserve.deploy.infra import InfraPaths
from tuneserve.deploy.keys import (
    EndpointKeys,
    keys_path,
    load_keys,
    provision_keys,
    resolve_key,
    save_keys,
)
from tuneserve.errors import InfraFileError


def test_keys_are_made_once_kept_private_and_reused(tmp_path: Path) -> None:
    paths = InfraPaths(tmp_path)
    keys, new = provision_keys(paths)
    assert new and keys.api_key != keys.admin_key and len(keys.api_key) > 40
    mode = stat.S_IMODE(keys_path(paths).stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert "*" in (keys_path(paths).parent / ".gitignore").read_text().splitlines()
    again, new_again = provision_keys(paths)
    assert again == keys and not new_again
    given, changed = provision_keys(paths, api_key="mine-1234567890")
    assert changed and given.api_key == "mine-1234567890" and given.admin_key == keys.admin_key
    assert load_keys(paths) == given


def test_an_admin_key_equal_to_the_api_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InfraFileError, match="--admin-key: must differ"):
        provision_keys(InfraPaths(tmp_path), api_key="same", admin_key="same")


def test_a_broken_keys_file_names_itself(tmp_path: Path) -> None:
    paths = InfraPaths(tmp_path)
    keys_path(paths).parent.mkdir(parents=True)
    keys_path(paths).write_text('{"api_key": 1}')
    with pytest.raises(InfraFileError, match=r"\.tuneserve/keys\.json: not a keys file"):
        load_keys(paths)


def test_the_key_given_wins_then_the_environment_then_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = InfraPaths(tmp_path)
    monkeypatch.delenv("TUNESERVE_API_KEY", raising=False)
    monkeypatch.delenv("TUNESERVE_ADMIN_KEY", raising=False)
    assert resolve_key(paths) is None
    save_keys(paths, EndpointKeys(api_key="user", admin_key="admin"))
    assert resolve_key(paths) == "admin"  # the admin key opens /v1 too
    monkeypatch.setenv("TUNESERVE_API_KEY", "from-env")
    assert resolve_key(paths) == "from-env"
    monkeypatch.setenv("TUNESERVE_ADMIN_KEY", "admin-env")
    assert resolve_key(paths, admin=True) == "admin-env"
    assert resolve_key(paths, "flag") == "flag"


def test_provision_shows_the_keys_once_and_replicas_get_them(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any], tmp_path: Path
) -> None:
    ws = fake_workspace()  # provisioned (local) by the fixture
    keys = load_keys(InfraPaths(ws))
    assert keys is not None
    assert cli("endpoint", "-w", ws, "--show-key").stdout.strip() == keys.api_key
    assert cli("endpoint", "-w", ws, "--show-admin-key").stdout.strip() == keys.admin_key

    again = cli("provision", "-w", ws, "--provider", "local")
    assert keys.api_key not in again.output  # shown once, at the first provision
    assert load_keys(InfraPaths(ws)) == keys

    endpoint = cli("deploy", "-w", ws, "--timeout", "30").stdout.strip().splitlines()[-1]
    assert get_json(endpoint + "/answer")["keys"] == [keys.api_key, keys.admin_key]
    # the keys never reach the share
    share = json.loads((ws / "infra" / "inference.config.json").read_text())
    shared = list((ws / share["STORAGE_ACCOUNT_NAME"]).rglob("keys.json"))
    assert shared == [], shared


def test_first_provision_prints_the_keys(
    tmp_path: Path, cli: Callable[..., Any], started_workspaces: list[Path]
) -> None:
    ws = tmp_path / "ws"
    cli("init", ws)
    started_workspaces.append(ws)
    result = cli("provision", "-w", ws, "--provider", "local", "--port", free_port())
    keys = load_keys(InfraPaths(ws))
    assert keys is not None
    assert keys.api_key in result.output and keys.admin_key in result.output
    assert ".tuneserve/keys.json" in result.output


def test_endpoint_show_key_before_provision_says_what_to_do(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    cli("init", tmp_path / "ws")
    result = cli("endpoint", "-w", tmp_path / "ws", "--show-key", ok=False)
    assert "tuneserve provision" in result.output
