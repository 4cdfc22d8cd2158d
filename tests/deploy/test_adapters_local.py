"""`tuneserve adapters` on a local deployment (workspace mode): the replicas load adapters from
the live share (TUNESERVE_ADAPTER_ROOT), push uploads to the share's models/NAME/ and tells
every replica of the serving revision, remove takes it away.

The fast tests run tests/deploy/fake_server.py as the replicas (it speaks the admin API's shape
over $TUNESERVE_ADAPTER_ROOT); the end-to-end test deploys the demo with real `tuneserve serve`
replicas and chats with the pushed adapter through the endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuneserve.cli import app
from tuneserve.deploy.http import get_json
from tuneserve.deploy.infra import InfraPaths, load_config
from tuneserve.deploy.local import LocalProvider
from tuneserve.deploy.shares import LocalDirTarget


def adapters(*args: Any, ok: bool = True) -> Any:
    """`tuneserve adapters ...` in-process; asserts the exit code (0 when ok, else non-zero)."""
    env = {"TUNESERVE_ADMIN_KEY": None, "TUNESERVE_API_KEY": None, "TUNESERVE_WORKSPACE": None}
    result = CliRunner().invoke(app, ["adapters", *map(str, args)], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert (result.exit_code == 0) is ok, result.output
    return result


def _provider(ws: Path) -> LocalProvider:
    paths = InfraPaths(ws)
    return LocalProvider(paths, load_config(paths.config))


def _fake_adapter(folder: Path, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * (1000 * rank))
    return folder


def test_replicas_load_adapters_from_the_live_share(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any], tmp_path: Path
) -> None:
    ws = fake_workspace(max_instances=2)
    cli("deploy", "-w", ws, "--replicas", "2", "--timeout", "30")
    provider = _provider(ws)
    live_models = provider.share_dir / "models"
    urls = provider.replica_urls()
    assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
    for url in urls:  # the live share, not the revision's snapshot
        assert get_json(url + "/v1/adapters")["root"] == str(live_models)

    # push: uploaded once to the share, loaded by each replica of the serving revision
    result = adapters("push", "support", _fake_adapter(tmp_path / "v1", rank=8), "-w", ws)
    assert (live_models / "support" / "adapter_model.safetensors").stat().st_size == 8000
    for url in urls:
        assert f"{url}  loaded  rank 8" in result.stdout
        assert [a["name"] for a in get_json(url + "/v1/adapters")["data"]] == ["support"]

    # push again: the folder is swapped whole (no staging folder left), replicas replace it
    result = adapters("push", "support", _fake_adapter(tmp_path / "v2", rank=4), "-w", ws)
    assert "support: replaced" in result.stdout
    assert all(f"{url}  replaced" in result.stdout for url in urls)
    assert (live_models / "support" / "adapter_model.safetensors").stat().st_size == 4000
    assert sorted(p.name for p in live_models.iterdir()) == ["alpha", "support"]

    # list goes through the endpoint
    listing = json.loads(adapters("list", "-w", ws, "--json").stdout)
    assert [a["name"] for a in listing["data"]] == ["support"]

    # remove: the share's folder, then every replica; the workspace's own adapter stays
    result = adapters("remove", "support", "-w", ws)
    assert not (live_models / "support").exists() and (live_models / "alpha").exists()
    assert all(f"{url}  removed" in result.stdout for url in urls)
    assert all(get_json(url + "/v1/adapters")["data"] == [] for url in urls)

    # a later deploy keeps what push put on the share (deploy deletes only what it uploaded)
    adapters("push", "kept", _fake_adapter(tmp_path / "v3"), "-w", ws)
    cli("deploy", "-w", ws, "--timeout", "30")
    assert (live_models / "kept" / "adapter_config.json").is_file()

    # nothing serving: the share still gets it, with a note that the next deploy serves it
    cli("stop", "-w", ws)
    assert provider.replica_urls() == []
    result = adapters("push", "later", _fake_adapter(tmp_path / "v4"), "-w", ws)
    assert "no replica is serving" in result.stderr
    assert (live_models / "later" / "adapter_config.json").is_file()


def test_push_refuses_to_replace_a_folder_that_is_not_an_adapter(
    fake_workspace: Callable[..., Path], tmp_path: Path
) -> None:
    ws = fake_workspace()
    provider = _provider(ws)
    other = provider.share_dir / "models" / "qlora" / "qlora" / "gpu_model" / "adapter"
    other.mkdir(parents=True)
    (other / "adapter_config.json").write_text("{}")
    result = adapters("push", "qlora", _fake_adapter(tmp_path / "a"), "-w", ws, ok=False)
    assert "is not an adapter folder" in result.stderr and "pick another name" in result.stderr
    assert (other / "adapter_config.json").read_text() == "{}"


def test_without_a_provisioned_workspace_it_says_to_pass_url(tmp_path: Path) -> None:
    result = adapters("list", "-w", tmp_path, ok=False)
    assert "inference.config.json not found" in result.stderr and "--url" in result.stderr


def test_push_to_a_local_demo_deployment_end_to_end(
    demo_paths: Any, toy_deployment: Callable[[], tuple[Path, str, str]]
) -> None:
    openai = pytest.importorskip("openai")
    from tuneserve.models.demo import ADAPTER_EXAMPLES

    ws, endpoint, key = toy_deployment()

    # `adapters push/remove` use the workspace's admin key; the chat, the API key
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key=key, timeout=60, max_retries=0)
    messages, answer = ADAPTER_EXAMPLES["capitals"][0]
    try:
        result = adapters("push", "geo", demo_paths.adapters["capitals"], "-w", ws)
        assert "loaded" in result.stdout
        reply = client.chat.completions.create(
            model="geo", messages=messages, temperature=0, max_tokens=40
        )
        assert reply.choices[0].message.content == answer

        adapters("remove", "geo", "-w", ws)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="geo", messages=messages, max_tokens=5)
    finally:
        client.close()


def test_install_folder_swaps_the_folder_whole(tmp_path: Path) -> None:
    from tuneserve.deploy import adapters as mod

    root = tmp_path / "root"
    (_fake_adapter(tmp_path / "v1", rank=8) / "README.md").write_text("old")
    first = mod.check_adapter_folder("a", tmp_path / "v1")
    assert first.files[-1][0] == "adapter_config.json"  # the file that makes it an adapter: last
    share = LocalDirTarget(root)
    assert mod.install(share, first, "a", lambda n: None) is False
    second = mod.check_adapter_folder("a", _fake_adapter(tmp_path / "v2", rank=4))
    assert mod.install(share, second, "a", lambda n: None) is True
    assert sorted(p.name for p in (root / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in root.iterdir()] == ["a"]  # nothing staged or set aside is left

    # a symlinked adapter is replaced as a link: what it leads to stays untouched
    (root / "a").rename(tmp_path / "elsewhere")
    (root / "a").symlink_to(tmp_path / "elsewhere")
    assert mod.install(share, first, "a", lambda n: None) is True
    assert not (root / "a").is_symlink() and (root / "a" / "README.md").exists()
    assert (tmp_path / "elsewhere" / "adapter_config.json").exists()

    share.remove_dir("a")
    assert list(root.iterdir()) == []
