"""Folders swapped into and out of a share whole, through the share's own calls (the path Azure
Files takes) and on a local folder; files replaced atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tuneserve.deploy.atomic import DEFAULT_MODE, write_atomic
from tuneserve.deploy.shares import LocalDirTarget, install_by_renames, remove_by_rename


def _files(folder: Path, **contents: str) -> list[tuple[str, Path]]:
    for name, text in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return [(name, folder / name) for name in contents]


def test_install_and_remove_by_renames_leave_nothing_hidden(tmp_path: Path) -> None:
    share = LocalDirTarget(tmp_path / "share")
    moved: list[int] = []
    v1 = _files(tmp_path / "v1", **{"a.txt": "one", "sub/b.txt": "two"})
    assert install_by_renames(share, "models/x", v1, moved.append) is False
    assert sum(moved) == len("one") + len("two")
    v2 = _files(tmp_path / "v2", **{"a.txt": "new"})
    assert install_by_renames(share, "models/x", v2, moved.append) is True
    assert sorted(share.list_files()) == ["models/x/a.txt"]
    assert (tmp_path / "share" / "models" / "x" / "a.txt").read_text() == "new"
    assert os.listdir(tmp_path / "share" / "models") == ["x"]  # nothing staged or set aside

    remove_by_rename(share, "models/x")
    assert share.list_files() == {} and os.listdir(tmp_path / "share" / "models") == []


def test_a_failed_upload_leaves_the_old_folder_serving(tmp_path: Path) -> None:
    share = LocalDirTarget(tmp_path / "share")
    share.install_dir("models/x", _files(tmp_path / "v1", **{"a.txt": "old"}), lambda n: None)
    missing = [("a.txt", tmp_path / "nowhere" / "a.txt")]
    with pytest.raises(FileNotFoundError):
        install_by_renames(share, "models/x", missing, lambda n: None)
    with pytest.raises(FileNotFoundError):
        share.install_dir("models/x", missing, lambda n: None)
    assert sorted(share.list_files()) == ["models/x/a.txt"]
    assert os.listdir(tmp_path / "share" / "models") == ["x"]


def test_write_atomic_modes_and_no_leftovers(tmp_path: Path) -> None:
    plain, secret = tmp_path / "a" / "config.json", tmp_path / "keys.json"
    write_atomic(plain, "{}\n")
    write_atomic(secret, b"key", mode=0o600)
    write_atomic(plain, "{ }\n")
    assert plain.read_text() == "{ }\n" and secret.read_bytes() == b"key"
    assert stat.S_IMODE(plain.stat().st_mode) == DEFAULT_MODE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json"]
