"""The adapter root: paths given to the admin API resolve inside it or are refused; a scan
names the adapter folders it holds and leaves out what a symlink brings in from outside."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tuneserve.models.adapter_root import (
    AdapterPathError,
    AdapterRoot,
    check_adapter_name,
    fingerprint,
)


def adapter(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def root(tmp_path: Path) -> AdapterRoot:
    adapter(tmp_path / "root" / "support")
    adapter(tmp_path / "root" / "team" / "qlora" / "gpu_model" / "adapter")
    (tmp_path / "root" / "notes").mkdir()
    adapter(tmp_path / "elsewhere")
    (tmp_path / "root" / "link-out").symlink_to(tmp_path / "elsewhere")
    return AdapterRoot.at(tmp_path / "root")


def test_relative_and_absolute_paths_inside_resolve(root: AdapterRoot) -> None:
    assert root.resolve("support") == root.path / "support"
    assert root.resolve(str(root.path / "support")) == root.path / "support"
    assert root.resolve("team/qlora/gpu_model/adapter").name == "adapter"


@pytest.mark.parametrize(
    "given, says",
    [
        ("../elsewhere", "'..'"),
        ("support/../../elsewhere", "'..'"),
        ("/tmp", "outside the adapter root"),
        ("link-out", "through a symlink"),
        ("nothing-here", "no folder"),
        ("notes", "holds no adapter_config.json"),
        ("  ", "empty"),
    ],
)
def test_escapes_and_non_adapters_are_refused(root: AdapterRoot, given: str, says: str) -> None:
    with pytest.raises(AdapterPathError, match=says):
        root.resolve(given)


def test_scan_names_folders_and_skips_symlinks_out(root: AdapterRoot) -> None:
    found = root.scan()
    assert found == {
        "support": root.path / "support",
        "team-qlora": root.path / "team" / "qlora" / "gpu_model" / "adapter",
    }


def test_fingerprint_changes_when_the_files_are_rewritten(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "a")
    before = fingerprint(folder)
    time.sleep(0.01)
    adapter(folder, weights=b"new weights")
    assert fingerprint(folder) != before
    os.remove(folder / "adapter_model.safetensors")
    assert [name for name, *_ in fingerprint(folder)] == ["adapter_config.json"]


@pytest.mark.parametrize("name", ["support", "qwen-1.5_v2", "a" * 128, "_private"])
def test_names_accepted(name: str) -> None:
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a/b", "..", "-x", ".hidden", "a" * 129, "é"])
def test_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not accepted"):
        check_adapter_name(name)


def test_a_folder_replaced_by_a_copy_with_the_same_sizes_and_times_is_seen(
    tmp_path: Path,
) -> None:
    """`cp -p` or copytree keep modification times (and the copy may reuse the freed inodes):
    the change time still tells a new file."""
    import shutil

    from tuneserve.models.adapter_root import fingerprint

    original = tmp_path / "original"
    original.mkdir()
    (original / "adapter_config.json").write_text("{}")
    (original / "adapter_model.safetensors").write_bytes(b"x" * 64)
    served = tmp_path / "served"
    shutil.copytree(original, served)
    before = fingerprint(served)
    shutil.rmtree(served)
    shutil.copytree(original, served)  # same sizes, same times
    assert fingerprint(served) != before
    assert fingerprint(served) == fingerprint(served)  # and stable while nothing changes
