"""Workspace -> share sync: what is synced, change detection, deletion rules."""

from __future__ import annotations

from pathlib import Path

from tuneserve.deploy.sync import MANIFEST, HashCache, LocalDirTarget, sync, workspace_files


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

    (share / "a.txt").write_text("changed on the share")
    fourth = sync(workspace_files(ws), target, hash_cache=cache, prune=True)
    assert fourth.uploaded == ["a.txt"] and (share / "a.txt").read_text() == "a"
    assert fourth.deleted == ["models/remote/adapter_config.json"]


def test_upload_replaces_by_rename_so_hard_links_keep_the_old_bytes(tmp_path: Path) -> None:
    ws, share = tmp_path / "ws", tmp_path / "share"
    _tree(ws, {"w.bin": "old"})
    sync(workspace_files(ws), LocalDirTarget(share))
    snapshot = tmp_path / "snapshot.bin"
    snapshot.hardlink_to(share / "w.bin")
    (ws / "w.bin").write_text("new!")
    sync(workspace_files(ws), LocalDirTarget(share))
    assert (share / "w.bin").read_text() == "new!" and snapshot.read_text() == "old"
