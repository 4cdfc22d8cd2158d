"""The shipped templates agree with each other and with the file formats (offline: the bicep is
parsed with pycep-parser; nothing is compiled or sent to Azure)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tuneserve.deploy.infra import (
    CONFIG_KEYS,
    DEFAULT_COMMANDS,
    PARAMETER_NAMES,
    InferenceParameters,
)

TEMPLATES = resources.files("tuneserve.templates")


@pytest.fixture(scope="module")
def bicep() -> dict[str, Any]:
    from pycep import BicepParser

    with resources.as_file(TEMPLATES.joinpath("inference.bicep")) as path:
        return BicepParser().parse(file_path=Path(path))


@pytest.fixture(scope="module")
def arm() -> dict[str, Any]:
    return json.loads(TEMPLATES.joinpath("inference.json").read_text(encoding="utf-8"))


def _find(tree: Any, key: str) -> list[Any]:
    """Every value under `key` anywhere in a nested dict/list."""
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                found.append(v)
            found += _find(v, key)
    elif isinstance(tree, list):
        for item in tree:
            found += _find(item, key)
    return found


def test_bicep_declares_exactly_the_parameters_and_outputs(bicep: dict[str, Any]) -> None:
    params = json.loads(TEMPLATES.joinpath("inference.parameters.json").read_text())["parameters"]
    assert set(bicep["parameters"]) == set(params) == set(PARAMETER_NAMES)
    assert list(bicep["outputs"]) == list(CONFIG_KEYS)
    assert bicep["parameters"]["defaultCommands"]["type"] == "array"
    count = bicep["parameters"]["maximumInstanceCount"]
    assert count["type"] == "int"
    assert {"type": "min_value", "argument": 1} in count["decorators"]


def test_arm_json_is_the_bicep_twin(bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    assert set(arm["parameters"]) == set(bicep["parameters"])
    for name, spec in arm["parameters"].items():
        assert spec["type"] == bicep["parameters"][name]["type"], name
    bicep_resources = sorted((r["type"], r["api_version"]) for r in bicep["resources"].values())
    arm_resources = sorted((r["type"], r["apiVersion"]) for r in arm["resources"])
    assert bicep_resources == arm_resources
    assert list(arm["outputs"]) == list(CONFIG_KEYS)
    assert all(o["type"] == "string" for o in arm["outputs"].values())


@pytest.mark.parametrize("which", ["bicep", "arm"])
def test_container_app_improvements(which: str, bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    if which == "bicep":
        app = next(r for r in bicep["resources"].values() if r["type"].endswith("containerApps"))
        body = app["config"]
        env = next(
            r for r in bicep["resources"].values() if r["type"].endswith("managedEnvironments")
        )["config"]
    else:
        body = next(r for r in arm["resources"] if r["type"].endswith("containerApps"))
        env = next(r for r in arm["resources"] if r["type"].endswith("managedEnvironments"))
    probes = {p["type"]: p["httpGet"]["path"] for p in _find(body, "probes")[0]}
    assert probes == {"Liveness": "/health", "Readiness": "/ready", "Startup": "/ready"}
    scale = _find(body, "scale")[0]
    assert scale["minReplicas"] == 1
    assert "maximumInstanceCount" in json.dumps(scale["maxReplicas"])
    assert scale["rules"][0]["http"]["metadata"]["concurrentRequests"]
    assert _find(body, "activeRevisionsMode") == ["Single"]
    assert _find(body, "workloadProfileName") == ["GPU"]
    assert _find(body, "mountPath") == ["/mount"]
    assert _find(body, "targetPort")[0] in (7860, "targetPort", "[variables('targetPort')]")
    profiles = _find(env, "workloadProfiles")[0]
    gpu = next(p for p in profiles if p["name"] == "GPU")
    assert gpu["workloadProfileType"] == "NC24-A100" and gpu["minimumCount"] == 0
    assert "maximumInstanceCount" in json.dumps(gpu["maximumCount"])
    command = _find(body, "command")[0]
    assert command[:2] == ["/bin/bash", "-c"]


def test_commands_are_joined_with_semicolons(bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    text = TEMPLATES.joinpath("inference.bicep").read_text()
    assert "join(defaultCommands, '; ')" in text
    assert arm["variables"]["command"] == "[join(parameters('defaultCommands'), '; ')]"


def test_default_parameters_file(bicep: dict[str, Any]) -> None:
    text = TEMPLATES.joinpath("inference.parameters.json").read_text()
    assert text == InferenceParameters.default().to_json()
    values = json.loads(text)["parameters"]
    assert values["defaultCommands"]["value"] == DEFAULT_COMMANDS
    assert DEFAULT_COMMANDS[-1].endswith(
        "tuneserve serve --workspace /mount --host 0.0.0.0 --port 7860"
    )
    assert any(".tuneserve-build" in c and "pip install" in c for c in DEFAULT_COMMANDS)


def test_derived_default_names_match_the_template(
    bicep: dict[str, Any], arm: dict[str, Any]
) -> None:
    prefixes = {
        "storageAccountName": "aistorage",
        "fileShareName": "aifileshare",
        "acaEnvironmentName": "aienv",
        "acaEnvironmentStorageName": "aienvstorage",
        "acaAppName": "aiacaapp",
        "acaLogAnalyticsName": "ailog",
    }
    for name, prefix in prefixes.items():
        default = arm["parameters"][name]["defaultValue"]
        assert default == (
            f"[format('{prefix}{{0}}', substring(uniqueString(resourceGroup().id), 0, 5))]"
        )
        assert json.dumps(bicep["parameters"][name]["default"]).find(prefix) >= 0
