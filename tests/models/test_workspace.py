"""discover_workspace on folders laid out like an AI Toolkit fine-tuning workspace."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tuneserve.errors import WorkspaceError
from tuneserve.models.demo import DemoPaths
from tuneserve.models.loader import load_served_model
from tuneserve.models.workspace import adapter_names, discover_workspace


def layout(root: Path, demo: DemoPaths) -> Path:
    """The demo arranged as AI Toolkit leaves it: base in model-cache/, adapters in models/."""
    base = root / "model-cache" / "tuneserve" / "demo-chat"
    base.parent.mkdir(parents=True)
    base.symlink_to(demo.base, target_is_directory=True)
    qlora = root / "models" / "qlora" / "qlora" / "gpu_model" / "adapter"
    qlora.parent.mkdir(parents=True)
    qlora.symlink_to(demo.adapters["capitals"], target_is_directory=True)
    shutil.copytree(demo.adapters["pirate"], root / "models" / "pirate" / "output" / "adapter")
    return root


def test_finds_the_base_and_names_adapters_readably(tmp_path: Path, demo_paths: DemoPaths) -> None:
    root = layout(tmp_path, demo_paths)
    base, adapters = discover_workspace(root)
    assert base == root / "model-cache" / "tuneserve" / "demo-chat"
    assert adapters == {
        "pirate": root / "models" / "pirate" / "output" / "adapter",
        "qlora": root / "models" / "qlora" / "qlora" / "gpu_model" / "adapter",
    }


def test_a_corrupt_adapter_does_not_stop_the_others(tmp_path: Path, demo_paths: DemoPaths) -> None:
    root = layout(tmp_path, demo_paths)
    broken = root / "models" / "broken" / "adapter"
    shutil.copytree(demo_paths.adapters["pirate"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    base, adapters = discover_workspace(root)
    served = load_served_model(str(base), adapters, dtype="float32", device="cpu")

    assert sorted(served.adapters) == ["pirate", "qlora"]
    assert list(served.adapter_errors) == ["broken"]
    assert str(broken / "adapter_model.safetensors") in served.adapter_errors["broken"]
    assert served.base_name == "demo-chat"


def test_a_workspace_without_adapters_serves_the_base(
    tmp_path: Path, demo_paths: DemoPaths
) -> None:
    (tmp_path / "model-cache" / "org").mkdir(parents=True)
    (tmp_path / "model-cache" / "org" / "m").symlink_to(demo_paths.base)
    assert discover_workspace(tmp_path) == (tmp_path / "model-cache" / "org" / "m", {})


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_several_base_models_are_listed(tmp_path: Path) -> None:
    first = _model(tmp_path / "model-cache" / "microsoft" / "Phi-3-mini-4k-instruct")
    second = _model(tmp_path / "model-cache" / "meta" / "Llama-3.2-1B")
    _model(first / "onnx")  # a model's own subfolder is not another model
    with pytest.raises(WorkspaceError) as caught:
        discover_workspace(tmp_path)
    message = str(caught.value)
    assert "2 models" in message and "--base" in message
    assert str(first) in message and str(second) in message


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        pytest.param(lambda root: None, "no model-cache/ folder", id="no-model-cache"),
        pytest.param(
            lambda root: (root / "model-cache" / "org" / "empty").mkdir(parents=True),
            "no base model",
            id="empty-model-cache",
        ),
    ],
)
def test_no_base_model(tmp_path: Path, setup: Callable[[Path], object], fragment: str) -> None:
    setup(tmp_path)
    with pytest.raises(WorkspaceError, match=fragment) as caught:
        discover_workspace(tmp_path)
    assert str(tmp_path) in str(caught.value) and "--base" in str(caught.value)


def test_a_missing_workspace(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="does not exist"):
        discover_workspace(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("paths", "names"),
    [
        pytest.param(["qlora/qlora/gpu_model/adapter"], ["qlora"], id="template-layout"),
        pytest.param(
            ["lora/run1/output", "lora/run2/output"], ["lora-run1", "lora-run2"], id="runs"
        ),
        pytest.param(
            ["phi/gpu_model/adapter", "phi/cpu_model/adapter"],
            ["phi-cpu_model-adapter", "phi-gpu_model-adapter"],
            id="clash-falls-back-to-the-path",
        ),
        pytest.param(["adapter"], ["adapter"], id="all-generic"),
        pytest.param(["my lora (v2)/adapter"], ["my-lora-v2"], id="odd-characters"),
        pytest.param(["a-b/adapter", "a/b/adapter"], ["a-b", "a-b-2"], id="clash-after-fallback"),
    ],
)
def test_adapter_names(paths: list[str], names: list[str]) -> None:
    root = Path("/ws/models")
    named = adapter_names([root / p for p in paths], relative_to=root)
    assert sorted(named) == names
    assert sorted(named.values()) == sorted(root / p for p in paths)
