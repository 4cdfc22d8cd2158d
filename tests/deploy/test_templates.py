"""The shipped templates agree with each other, with the file formats and with the package
(offline: the bicep is parsed with pycep-parser, the ARM JSON's expressions are evaluated by the
Azure stand-in's small evaluator; nothing is compiled or sent to Azure)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.deploy.azure_standin import ArmScope, arm_value
from tuneserve.deploy.infra import (
    CONFIG_KEYS,
    CONTAINER_IMAGE,
    CONTAINER_IMAGE_PYTHON,
    CONTAINER_IMAGE_TORCH,
    DEFAULT_COMMANDS,
    DEFAULT_MAXIMUM_INSTANCE_COUNT,
    PARAMETER_NAMES,
    SHUTDOWN_TIMEOUT_S,
    TERMINATION_GRACE_S,
    InferenceParameters,
    gpu_plan,
)
from tuneserve.settings import DEFAULT_SHUTDOWN_TIMEOUT_S

TEMPLATES = resources.files("tuneserve.templates")
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# Parameters the templates declare beyond inference.parameters.json's nine (whose format is the
# AI Toolkit's and stays exactly), each with why it is not in that file:
EXTRA_PARAMETERS = {
    # secrets: passed by `tuneserve provision` from .tuneserve/keys.json at deployment time and
    # kept as Container Apps secrets; never written to a file (no default: a hand deploy asks)
    "apiKey": "the endpoint's API key (secure)",
    "adminKey": "the endpoint's admin key (secure)",
    # passed only when an existing (shared) environment's GPU profile holds more nodes than
    # maximumInstanceCount, so provisioning never lowers it; defaults to maximumInstanceCount
    "gpuProfileMaximumCount": "keeps a shared environment's larger GPU profile",
}
SECURE_PARAMETERS = {"apiKey", "adminKey"}
KEY_SECRETS = {"TUNESERVE_API_KEY": "apiKey", "TUNESERVE_ADMIN_KEY": "adminKey"}


@pytest.fixture(scope="module")
def bicep() -> dict[str, Any]:
    from pycep import BicepParser

    with resources.as_file(TEMPLATES.joinpath("inference.bicep")) as path:
        # the parser's BicepJson is a TypedDict; the tests walk it as a plain nested dict
        return cast(dict[str, Any], BicepParser().parse(file_path=Path(path)))


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


def _resource(template: dict[str, Any], kind: str, which: str) -> dict[str, Any]:
    """The body of the resource of type `kind` (its config in the bicep tree)."""
    if which == "bicep":
        return next(r for r in template["resources"].values() if r["type"].endswith(kind))["config"]
    return next(r for r in template["resources"] if r["type"].endswith(kind))


def _container(template: dict[str, Any], which: str) -> dict[str, Any]:
    app = _resource(template, "containerApps", which)
    return dict(app["properties"]["template"]["containers"][0])


def _bicep_eval(node: Any, bicep: dict[str, Any], params: dict[str, int]) -> Any:
    """Evaluate the integer arithmetic of a pycep expression tree (identifiers are parameters,
    else variables, else parameter defaults)."""
    if isinstance(node, int):
        return node
    if isinstance(node, str):
        if node in params:
            return params[node]
        if node in bicep["variables"]:
            return _bicep_eval(bicep["variables"][node]["value"], bicep, params)
        return _bicep_eval(bicep["parameters"][node]["default"], bicep, params)
    if "function" in node:
        args = [_bicep_eval(a, bicep, params) for a in node["function"]["parameters"].values()]
        return {"max": max, "min": min}[node["function"]["type"]](args)
    op = node["operator"]
    a, b = (_bicep_eval(v, bicep, params) for v in op["operands"].values())
    return {"substract": a - b, "add": a + b}[op["type"]]


def _arm_scope(arm: dict[str, Any], **params: Any) -> ArmScope:
    return ArmScope("sub-1", "rg-1", dict(params), arm)


# --- parameters and outputs ----------------------------------------------------------------


def test_bicep_declares_the_parameters_file_plus_the_reasoned_extras(
    bicep: dict[str, Any],
) -> None:
    params = json.loads(TEMPLATES.joinpath("inference.parameters.json").read_text())["parameters"]
    assert set(params) == set(PARAMETER_NAMES)  # the AI Toolkit's nine, exactly
    assert set(bicep["parameters"]) == set(PARAMETER_NAMES) | set(EXTRA_PARAMETERS)
    assert list(bicep["outputs"]) == list(CONFIG_KEYS)
    assert bicep["parameters"]["defaultCommands"]["type"] == "array"
    count = bicep["parameters"]["maximumInstanceCount"]
    assert count["type"] == "int"
    assert {"type": "min_value", "argument": 1} in count["decorators"]


def test_arm_json_is_the_bicep_twin(bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    assert set(arm["parameters"]) == set(bicep["parameters"])
    for name, spec in arm["parameters"].items():
        bicep_type = bicep["parameters"][name]["type"]
        secure = {"type": "secure"} in bicep["parameters"][name]["decorators"]
        assert spec["type"] == ("securestring" if secure else bicep_type), name
    bicep_resources = sorted((r["type"], r["api_version"]) for r in bicep["resources"].values())
    arm_resources = sorted((r["type"], r["apiVersion"]) for r in arm["resources"])
    assert bicep_resources == arm_resources
    assert list(arm["outputs"]) == list(CONFIG_KEYS)
    assert all(o["type"] == "string" for o in arm["outputs"].values())


def test_keys_are_secure_parameters_without_defaults(
    bicep: dict[str, Any], arm: dict[str, Any]
) -> None:
    """No default: a deployment by hand (az deployment group create) must ask for the keys."""
    for name in SECURE_PARAMETERS:
        assert {"type": "secure"} in bicep["parameters"][name]["decorators"], name
        assert bicep["parameters"][name]["default"] is None, name
        assert arm["parameters"][name]["type"] == "securestring", name
        assert "defaultValue" not in arm["parameters"][name], name
    # and the only secure ones: nothing else is hidden from the deployment's record
    assert {n for n, p in arm["parameters"].items() if p["type"] == "securestring"} == (
        SECURE_PARAMETERS
    )


@pytest.mark.parametrize("which", ["bicep", "arm"])
def test_keys_reach_the_container_as_secret_refs(
    which: str, bicep: dict[str, Any], arm: dict[str, Any]
) -> None:
    template = bicep if which == "bicep" else arm
    app = _resource(template, "containerApps", which)
    secrets = {s["name"]: s["value"] for s in app["properties"]["configuration"]["secrets"]}
    env = {e["name"]: e for e in _container(template, which)["env"]}
    for var, param in KEY_SECRETS.items():
        ref = env[var]["secretRef"]
        assert "value" not in env[var], var  # never the key itself in the template
        expected = param if which == "bicep" else f"[parameters('{param}')]"
        assert secrets[ref] == expected, var


def test_endpoint_output_is_the_ingress_fqdn(bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    """ACA_APP_ENDPOINT as the AI Toolkit's template writes it: the bare FQDN (the config keeps
    it; InferenceConfig.endpoint_url adds https:// when reading)."""
    chain = []
    node = bicep["outputs"]["ACA_APP_ENDPOINT"]["value"]
    while isinstance(node, dict):
        first, node = node["operator"]["operands"].values()
        chain.append(first)
    chain.append(node)
    assert chain == ["acaApp", "properties", "configuration", "ingress", "fqdn"]
    scope = _arm_scope(arm)
    app_id = scope.resource_id("Microsoft.App/containerApps", "myapp").lower()
    scope.resources[app_id] = {"configuration": {"ingress": {"fqdn": "myapp.example.io"}}}
    scope.parameters["acaAppName"] = "myapp"
    value = arm_value(arm["outputs"]["ACA_APP_ENDPOINT"]["value"], scope)
    assert value == "myapp.example.io"


# --- the image and the package's requirements --------------------------------------------------


def _image_of(template: dict[str, Any], which: str) -> str:
    return str(_container(template, which)["image"])


def test_image_is_the_constant_and_satisfies_the_package_floors(
    bicep: dict[str, Any], arm: dict[str, Any]
) -> None:
    """Both templates run CONTAINER_IMAGE; its torch and Python satisfy pyproject's `torch>=`
    and `requires-python` and the installed transformers' own floors (transformers 5 disables
    torch < 2.6), and pyproject's floor is no lower than transformers' (else pip would keep an
    image's older torch). So the image and the requirements cannot drift apart."""
    assert _image_of(bicep, "bicep") == _image_of(arm, "arm") == CONTAINER_IMAGE
    m = re.fullmatch(
        r"docker\.io/pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", CONTAINER_IMAGE
    )
    assert m, f"not an official pytorch/pytorch runtime tag: {CONTAINER_IMAGE}"
    torch, python = Version(m.group(1)), Version(CONTAINER_IMAGE_PYTHON)
    assert torch == Version(CONTAINER_IMAGE_TORCH)

    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    torch_req = next(Requirement(d) for d in project["dependencies"] if d.startswith("torch"))
    assert torch in torch_req.specifier, f"image torch {torch} vs pyproject {torch_req}"
    assert python in SpecifierSet(project["requires-python"])

    transformers_torch = next(
        Requirement(r)
        for r in importlib.metadata.requires("transformers") or []
        if re.match(r"torch\b", r) and 'extra == "torch"' in r
    )
    assert torch in transformers_torch.specifier
    python_floor = importlib.metadata.metadata("transformers")["Requires-Python"]
    assert python in SpecifierSet(python_floor)
    floor = min(Version(s.version) for s in torch_req.specifier if s.operator == ">=")
    their_floor = min(
        Version(s.version) for s in transformers_torch.specifier if s.operator == ">="
    )
    assert floor >= their_floor
    # the CPU torch scripts/setup installs satisfies the floor too
    setup = (PYPROJECT.parent / "scripts" / "setup").read_text(encoding="utf-8")
    pinned = re.search(r'"torch==([\d.]+)"', setup)
    assert pinned and Version(pinned.group(1)) in torch_req.specifier


# --- lifecycle: termination grace, nodes vs replicas ---------------------------------------------


@pytest.mark.parametrize("which", ["bicep", "arm"])
def test_termination_grace_matches_the_shutdown_timeout(
    which: str, bicep: dict[str, Any], arm: dict[str, Any]
) -> None:
    template = bicep if which == "bicep" else arm
    app = _resource(template, "containerApps", which)
    # the platform kills TERMINATION_GRACE_S after SIGTERM: the whole drain of
    # `tuneserve serve --shutdown-timeout` (default 30 s) plus time to exit, as the local
    # provider's stop
    assert app["properties"]["template"]["terminationGracePeriodSeconds"] == TERMINATION_GRACE_S
    assert SHUTDOWN_TIMEOUT_S == DEFAULT_SHUTDOWN_TIMEOUT_S == 30
    assert SHUTDOWN_TIMEOUT_S < TERMINATION_GRACE_S


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("shared", [None, 1, 4])
def test_nodes_and_replicas_are_gpu_plan(
    count: int, shared: int | None, bicep: dict[str, Any], arm: dict[str, Any]
) -> None:
    """Both templates compute what infra.gpu_plan does: the GPU profile holds
    max(gpuProfileMaximumCount, maximumInstanceCount) nodes, the app at most
    max(1, maximumInstanceCount - 1) replicas."""
    plan = gpu_plan(count, shared)
    given = {"maximumInstanceCount": count}
    if shared is not None and shared > count:  # what provision passes
        given["gpuProfileMaximumCount"] = shared

    scope = _arm_scope(arm, **given)
    env = _resource(arm, "managedEnvironments", "arm")
    gpu = next(p for p in env["properties"]["workloadProfiles"] if p["name"] == "GPU")
    scale = _resource(arm, "containerApps", "arm")["properties"]["template"]["scale"]
    assert arm_value(gpu["maximumCount"], scope) == plan.nodes
    assert arm_value(scale["maxReplicas"], scope) == plan.max_replicas

    env = _resource(bicep, "managedEnvironments", "bicep")
    gpu = next(p for p in env["properties"]["workloadProfiles"] if p["name"] == "GPU")
    scale = _resource(bicep, "containerApps", "bicep")["properties"]["template"]["scale"]
    assert _bicep_eval(gpu["maximumCount"], bicep, given) == plan.nodes
    assert _bicep_eval(scale["maxReplicas"], bicep, given) == plan.max_replicas


def test_gpu_plan_leaves_a_node_for_the_new_revision() -> None:
    """The arithmetic in one place: a deploy rolls (new revision beside the old) exactly when
    the GPU profile holds a node more than the app's replicas."""
    table = {
        # (maximumInstanceCount, shared profile) -> (nodes, max replicas, rolls)
        (1, None): (1, 1, False),  # the single-node gap: restart in place
        (2, None): (2, 1, True),  # the default
        (3, None): (3, 2, True),
        (8, None): (8, 7, True),
        (1, 3): (3, 1, True),  # a shared profile's spare node serves the new revision
        (2, 1): (2, 1, True),  # a smaller shared profile grows, never the other way
        (4, 6): (6, 3, True),
    }
    for (count, shared), (nodes, replicas, rolls) in table.items():
        plan = gpu_plan(count, shared)
        assert (plan.nodes, plan.max_replicas, plan.rolls) == (nodes, replicas, rolls), count
    with pytest.raises(ValueError, match="at least 1"):
        gpu_plan(0)


@pytest.mark.parametrize("which", ["bicep", "arm"])
def test_container_app_improvements(which: str, bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    template = bicep if which == "bicep" else arm
    body = _resource(template, "containerApps", which)
    env = _resource(template, "managedEnvironments", which)
    probes = {p["type"]: p["httpGet"]["path"] for p in _find(body, "probes")[0]}
    assert probes == {"Liveness": "/health", "Readiness": "/ready", "Startup": "/ready"}
    scale = _find(body, "scale")[0]
    assert scale["minReplicas"] == 1
    assert scale["rules"][0]["http"]["metadata"]["concurrentRequests"]
    assert _find(body, "activeRevisionsMode") == ["Single"]
    assert _find(body, "workloadProfileName") == ["GPU"]
    assert _find(body, "mountPath") == ["/mount"]
    assert _find(body, "targetPort")[0] in (7860, "targetPort", "[variables('targetPort')]")
    profiles = _find(env, "workloadProfiles")[0]
    gpu = next(p for p in profiles if p["name"] == "GPU")
    assert gpu["workloadProfileType"] == "NC24-A100" and gpu["minimumCount"] == 0
    command = _find(body, "command")[0]
    assert command[:2] == ["/bin/bash", "-c"]


def test_commands_are_joined_with_semicolons(bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    text = TEMPLATES.joinpath("inference.bicep").read_text()
    assert "join(defaultCommands, '; ')" in text
    assert arm["variables"]["command"] == "[join(parameters('defaultCommands'), '; ')]"


def test_default_parameters_file(bicep: dict[str, Any], arm: dict[str, Any]) -> None:
    text = TEMPLATES.joinpath("inference.parameters.json").read_text()
    assert text == InferenceParameters.default().to_json()
    values = json.loads(text)["parameters"]
    assert values["defaultCommands"]["value"] == DEFAULT_COMMANDS
    assert DEFAULT_COMMANDS[-1].endswith(
        "tuneserve serve --workspace /mount --host 0.0.0.0 --port 7860"
    )
    assert any(".tuneserve-build" in c and "pip install" in c for c in DEFAULT_COMMANDS)
    # two nodes by default, so the default deploy has no gap
    assert DEFAULT_MAXIMUM_INSTANCE_COUNT == 2 and gpu_plan(2).rolls
    assert values["maximumInstanceCount"]["value"] == DEFAULT_MAXIMUM_INSTANCE_COUNT
    assert bicep["parameters"]["maximumInstanceCount"]["default"] == DEFAULT_MAXIMUM_INSTANCE_COUNT
    assert arm["parameters"]["maximumInstanceCount"]["defaultValue"] == (
        DEFAULT_MAXIMUM_INSTANCE_COUNT
    )


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
