"""Workspace -> share sync on real folders (LocalDirTarget; the Azure share implements the same
SyncTarget interface): what is synced, change detection, deletion rules, files deploy did not
upload (kept unless forced, adopted when identical), model-cache/ only when asked."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tuneserve.deploy.shares import HashingTarget, LocalDirTarget, RemoteFile, file_sha256
from tuneserve.deploy.sync import MANIFEST, HashCache, base_models, sync, workspace_files
from tuneserve.errors import DeployError


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_workspace_files_skip_state_infra_caches_and_ignored(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "model-cache/org/m/config.json": "{}",
            "models/a/adapter/adapter_config.json": "{}",
            "inference/app.py": "x",
            "inference/__pycache__/app.cpython-311.pyc": "x",
            ".tuneserve/storage/share/x": "x",
            "infra/inference.config.json": "{}",
            ".git/HEAD": "x",
            ".venv/bin/python": "x",
            "cache/hf/blob": "x",
            "notes.tmp": "x",
            ".tuneserveignore": "cache\n# comment\n*.log\n",
            "run.log": "x",
        },
    )
    assert sorted(workspace_files(tmp_path)) == [
        "inference/app.py",
        "model-cache/org/m/config.json",
        "models/a/adapter/adapter_config.json",
    ]


def test_only_changed_files_upload_and_deletions_spare_foreign_files(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _tree(ws, {"a.txt": "a", "b.txt": "b", "sub/c.txt": "c"})
    _tree(share, {"models/remote/adapter_config.json": "{}"})  # the fine-tuning step's
    target, cache = LocalDirTarget(share), HashCache(tmp_path / "hashes.json")

    first = sync(workspace_files(ws), target, hash_cache=cache)
    assert sorted(first.uploaded) == ["a.txt", "b.txt", "sub/c.txt"]
    assert (share / MANIFEST).exists()
    again = sync(workspace_files(ws), target, hash_cache=HashCache(tmp_path / "hashes.json"))
    assert again.uploaded == [] and again.unchanged == 3

    (ws / "b.txt").write_text("B")  # same size, new content
    (ws / "sub" / "c.txt").unlink()
    third = sync(workspace_files(ws), target, hash_cache=cache)
    assert third.uploaded == ["b.txt"] and third.deleted == ["sub/c.txt"]
    assert (share / "b.txt").read_text() == "B"
    assert (share / "models/remote/adapter_config.json").exists()  # not ours: kept

    (share / "a.txt").write_text("changed on the share")  # by someone else: not ours now
    fourth = sync(workspace_files(ws), target, hash_cache=cache, prune=True)
    assert fourth.uploaded == [] and fourth.kept == ["a.txt"]
    assert fourth.deleted == ["models/remote/adapter_config.json"]
    fifth = sync(workspace_files(ws), target, hash_cache=cache, force=True)
    assert fifth.uploaded == ["a.txt"] and (share / "a.txt").read_text() == "a"


def test_upload_replaces_by_rename_so_hard_links_keep_the_old_bytes(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _tree(ws, {"w.bin": "old"})
    sync(workspace_files(ws), LocalDirTarget(share))
    snapshot = tmp_path / "snapshot.bin"
    snapshot.hardlink_to(share / "w.bin")
    (ws / "w.bin").write_text("new!")
    sync(workspace_files(ws), LocalDirTarget(share))
    assert (share / "w.bin").read_text() == "new!" and snapshot.read_text() == "old"


# --- files deploy did not upload are the share's ------------------------------------------------


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400, highlight=False), out


def _manifest(share: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((share / MANIFEST).read_text())
    return data


def test_a_share_file_deploy_did_not_upload_is_kept_until_force(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    adapter = "models/qlora/qlora/gpu_model/adapter/adapter_model.safetensors"
    _tree(ws, {"app.py": "x", adapter: "downloaded long ago"})
    _tree(share, {adapter: "trained remotely, newer"})  # the fine-tuning step wrote it

    console, out = _console()
    result = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert result.uploaded == ["app.py"] and result.kept == [adapter]
    assert (share / adapter).read_text() == "trained remotely, newer"
    assert adapter not in _manifest(share)
    said = out.getvalue()
    assert "warning:" in said and adapter in said and "--force" in said
    assert "kept on the share (--force replaces them)" in result.summary()

    again = sync(workspace_files(ws), LocalDirTarget(share), console=_console()[0])
    assert again.uploaded == [] and again.kept == [adapter]  # said again on every deploy

    forced = sync(workspace_files(ws), LocalDirTarget(share), force=True, console=console)
    assert forced.uploaded == [adapter] and forced.replaced == [adapter] and not forced.kept
    assert (share / adapter).read_text() == "downloaded long ago"
    assert _manifest(share)[adapter]["size"] == len("downloaded long ago")
    (ws / adapter).unlink()  # ours now: deleted when the workspace drops it
    assert sync(workspace_files(ws), LocalDirTarget(share)).deleted == [adapter]


def test_the_same_file_on_the_share_is_adopted_silently(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    adapter = "models/pirate/adapter_model.safetensors"
    _tree(ws, {adapter: "same bytes"})
    _tree(share, {adapter: "same bytes"})  # the user downloaded the remote adapter
    console, out = _console()
    result = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert result.adopted == [adapter] and result.unchanged == 1
    assert result.uploaded == [] and not result.kept and "warning" not in out.getvalue()
    assert _manifest(share)[adapter]["sha256"] == file_sha256(ws / adapter)

    (ws / adapter).write_text("retrained here")  # ours now: a change is uploaded
    changed = sync(workspace_files(ws), LocalDirTarget(share))
    assert changed.uploaded == [adapter] and (share / adapter).read_text() == "retrained here"


def test_a_file_changed_on_the_share_after_deploy_uploaded_it_is_not_ours(
    tmp_path: Path,
) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _tree(ws, {"models/a/weights.bin": "v1", "models/b/weights.bin": "v1", "notes.txt": "n"})
    sync(workspace_files(ws), LocalDirTarget(share))
    # the fine-tuning step rewrites both on the share; the workspace changes one, drops one
    (share / "models/a/weights.bin").write_text("v2 from the cloud")
    (share / "models/b/weights.bin").write_text("v2 from the cloud")
    (ws / "models/a/weights.bin").write_text("v1 edited")
    (ws / "models/b/weights.bin").unlink()
    # a touch keeps the bytes: the file is still ours
    os.utime(share / "notes.txt", ns=(1, 1))
    (ws / "notes.txt").write_text("N")

    console, out = _console()
    result = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert result.kept == ["models/a/weights.bin", "models/b/weights.bin"]
    assert result.uploaded == ["notes.txt"] and result.deleted == []
    assert (share / "models/a/weights.bin").read_text() == "v2 from the cloud"
    assert (share / "models/b/weights.bin").read_text() == "v2 from the cloud"
    assert "changed on the share since deploy uploaded it; not deleted" in out.getvalue()

    forced = sync(workspace_files(ws), LocalDirTarget(share), force=True)
    assert forced.uploaded == ["models/a/weights.bin"]
    assert forced.deleted == ["models/b/weights.bin"]
    assert sorted(forced.replaced) == ["models/a/weights.bin", "models/b/weights.bin"]
    assert (share / "models/a/weights.bin").read_text() == "v1 edited"


class _NoHashShare:
    """A share that cannot hash its files (as a remote share without that method)."""

    def __init__(self, root: Path) -> None:
        self._dir = LocalDirTarget(root)

    def __getattr__(self, name: str) -> Any:
        if name == "sha256":
            raise AttributeError(name)
        return getattr(self._dir, name)


def test_a_share_that_cannot_hash_keeps_what_it_cannot_compare(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _tree(ws, {"same.bin": "abc"})
    _tree(share, {"same.bin": "abc"})
    target = _NoHashShare(share)
    assert not isinstance(target, HashingTarget)
    result = sync(workspace_files(ws), target, console=_console()[0])
    assert result.kept == ["same.bin"] and result.adopted == []


class _FailingShare(LocalDirTarget):
    """Fails the upload after `ok` files, as a dropped connection would."""

    def __init__(self, root: Path, ok: int) -> None:
        super().__init__(root)
        self.ok = ok

    def upload(self, src: Path, rel: str, advance: Callable[[int], None]) -> RemoteFile:
        if self.ok == 0:
            raise ConnectionError("the share went away")
        self.ok -= 1
        return super().upload(src, rel, advance)


def test_a_sync_cut_short_leaves_files_the_next_one_knows_as_its_own(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _tree(ws, {"a.txt": "a1", "b.txt": "b1", "c.txt": "c1"})
    sync(workspace_files(ws), LocalDirTarget(share))
    for name in ("a.txt", "b.txt", "c.txt"):
        (ws / name).write_text(name[0] + "2")
    with pytest.raises(ConnectionError):
        sync(workspace_files(ws), _FailingShare(share, ok=1))
    assert (share / "a.txt").read_text() == "a2" and (share / "b.txt").read_text() == "b1"

    console, out = _console()
    result = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert result.kept == [] and "warning" not in out.getvalue()
    assert sorted(result.uploaded) == ["a.txt", "b.txt", "c.txt"]  # a.txt: not trusted half-done
    assert [(share / n).read_text() for n in ("a.txt", "b.txt", "c.txt")] == ["a2", "b2", "c2"]


# --- model-cache/ ------------------------------------------------------------------------------

BASE = "model-cache/org/base-model"


def _model_workspace(ws: Path) -> None:
    _tree(
        ws,
        {
            f"{BASE}/config.json": '{"model_type": "llama"}',
            f"{BASE}/model.safetensors": "w" * 3000,
            "models/pirate/adapter_config.json": "{}",
        },
    )


def test_model_cache_is_uploaded_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _model_workspace(ws)
    monkeypatch.setattr("tuneserve.deploy.sync.AUTO_MODEL_CACHE_BYTES", 1000)  # "large": 3 KB

    # an empty share: refused before anything is uploaded, saying why and what to pass
    with pytest.raises(DeployError) as info:
        sync(workspace_files(ws), LocalDirTarget(share), console=_console()[0])
    message = str(info.value)
    assert "no base model under model-cache/" in message and "would not find" in message
    assert BASE in message and "3.0 KiB" in message and "--include-model-cache" in message
    assert not share.exists() or LocalDirTarget(share).list_files() == {}

    console, out = _console()
    first = sync(
        workspace_files(ws), LocalDirTarget(share), include_model_cache=True, console=console
    )
    assert f"{BASE}/model.safetensors" in first.uploaded
    assert "uploading 3 file(s) (3.0 KiB, model-cache/ 3.0 KiB of it)" in out.getvalue()

    # the share has the base model now: changes to it stay here unless asked
    (ws / BASE / "model.safetensors").write_text("v" * 5000)
    (ws / "models/pirate/adapter_config.json").write_text('{"r": 8}')
    console, out = _console()
    second = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert second.uploaded == ["models/pirate/adapter_config.json"]
    assert second.held_back == [f"{BASE}/model.safetensors"] and second.bytes_held_back == 5000
    said = out.getvalue()
    assert (
        "model-cache/ (4.9 KiB, 1 file(s) not on the share as they are here) not uploaded" in said
    )
    assert f"the share already has {BASE}" in said and "--include-model-cache" in said
    assert (share / BASE / "model.safetensors").read_text() == "w" * 3000
    assert "model-cache/ not uploaded (4.9 KiB)" in second.summary()

    # nor deleted: not when the workspace drops it, not with prune
    (ws / BASE / "model.safetensors").unlink()
    pruned = sync(workspace_files(ws), LocalDirTarget(share), prune=True, console=console)
    assert pruned.deleted == [] and (share / BASE / "model.safetensors").exists()

    asked = sync(
        workspace_files(ws), LocalDirTarget(share), include_model_cache=True, console=console
    )
    assert asked.deleted == [f"{BASE}/model.safetensors"]


def test_a_small_base_model_goes_to_a_share_without_one_unasked(tmp_path: Path) -> None:
    """The simplest path (init --demo, provision, deploy) needs no flag; --no-model-cache
    leaves it out, with a warning instead of the refusal."""
    ws, share = tmp_path / "ws", tmp_path / "share"
    _model_workspace(ws)
    console, out = _console()
    left_out = sync(
        workspace_files(ws), LocalDirTarget(share), include_model_cache=False, console=console
    )
    assert left_out.uploaded == ["models/pirate/adapter_config.json"]
    assert "no base model under model-cache/" in out.getvalue() and "left out" in out.getvalue()

    console, out = _console()
    first = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert f"{BASE}/model.safetensors" in first.uploaded
    assert f"the share has no base model yet: uploading {BASE} (3.0 KiB" in out.getvalue()
    # once the share has it, later changes stay here unless asked
    (ws / BASE / "model.safetensors").write_text("v" * 10)
    again = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert again.held_back == [f"{BASE}/model.safetensors"]


def test_model_cache_the_share_already_has_from_fine_tuning_is_left_alone(
    tmp_path: Path,
) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _model_workspace(ws)
    _tree(share, {"model-cache/org/base-model/config.json": "{}"})  # the fine-tuning step's
    console, out = _console()
    result = sync(workspace_files(ws), LocalDirTarget(share), console=console)
    assert result.uploaded == ["models/pirate/adapter_config.json"]
    assert "model-cache/ (3.0 KiB, 2 file(s)" in out.getvalue()
    assert (share / "model-cache/org/base-model/config.json").read_text() == "{}"
    assert not (share / BASE / "model.safetensors").exists()


def test_base_models_reads_the_layout_like_the_server() -> None:
    paths = [
        "model-cache/org/m/config.json",
        "model-cache/flat/config.json",
        "model-cache/org/a/config.json",
        "model-cache/org/a/adapter_config.json",  # an adapter, not a base
        "model-cache/.hidden/m/config.json",
        "models/x/config.json",
        "model-cache/config.json",
    ]
    assert base_models(paths) == ["model-cache/flat", "model-cache/org/m"]


def test_tuneserve_deploy_flags_reach_the_share(
    fake_workspace: Callable[..., Path], cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tuneserve deploy` on the local provider (fake_server.py replicas): the refusal of a
    large base model, then --include-model-cache, a file written on the share kept, then
    --force."""
    from tuneserve.deploy.infra import InfraPaths, load_config
    from tuneserve.deploy.local import LocalProvider

    ws = fake_workspace()
    _tree(ws, {f"{BASE}/config.json": "{}", f"{BASE}/model.safetensors": "w" * 100})
    paths = InfraPaths(ws)
    share = LocalProvider(paths, load_config(paths.config)).share_dir
    monkeypatch.setattr("tuneserve.deploy.sync.AUTO_MODEL_CACHE_BYTES", 10)  # "large": 100 B

    refused = cli("deploy", "-w", ws, "--timeout", "30", ok=False)
    assert "has no base model under model-cache/" in refused.stderr
    assert "tuneserve deploy --include-model-cache" in refused.stderr
    assert not (share / "answer.txt").exists()  # refused before anything was uploaded

    cli("deploy", "-w", ws, "--timeout", "30", "--include-model-cache")
    assert (share / BASE / "model.safetensors").read_text() == "w" * 100

    remote = share / "models" / "alpha" / "adapter_config.json"
    remote.write_text('{"trained": "remotely"}')  # the fine-tuning step writes the share
    kept = cli("deploy", "-w", ws, "--timeout", "30")
    assert "kept 1 file(s)" in kept.stderr and "models/alpha/adapter_config.json" in kept.stderr
    assert "1 kept on the share (--force replaces them)" in kept.stderr
    assert remote.read_text() == '{"trained": "remotely"}'

    cli("deploy", "-w", ws, "--timeout", "30", "--force")
    assert remote.read_text() == "{}"
