"""The infra/ file formats: validation messages, Azure naming rules, the derived names, init and
provision (no processes, no network)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tuneserve.deploy import naming
from tuneserve.deploy.infra import (
    CONFIG_KEYS,
    PARAMETER_NAMES,
    InferenceParameters,
    load_complete_config,
    load_config,
    load_parameters,
)
from tuneserve.errors import InfraFileError, NotProvisionedError


def _params(**values: Any) -> str:
    data = json.loads(InferenceParameters.default().to_json())
    for key, value in values.items():
        data["parameters"][key] = value
    return json.dumps(data, indent=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '{"parameters": {\n  "location": {"value": null},\n}}',
            "line 3, column 1: not valid JSON",
            id="trailing-comma",
        ),
        pytest.param("[]", "expected a JSON object", id="not-an-object"),
        pytest.param("{}", "missing key 'parameters'", id="no-parameters"),
        pytest.param(_params(gpuCount={"value": 1}), "unknown parameter 'gpuCount'", id="unknown"),
        pytest.param(
            _params(maximumInstanceCount={"value": 0}),
            "maximumInstanceCount: must be at least 1 (got 0)",
            id="count-0",
        ),
        pytest.param(
            _params(maximumInstanceCount={"value": "2"}),
            "maximumInstanceCount.value: Input should be a valid integer (got a string",
            id="count-string",
        ),
        pytest.param(
            _params(defaultCommands={"value": "python app.py"}),
            "defaultCommands.value: Input should be a valid list",
            id="commands-string",
        ),
        pytest.param(
            _params(defaultCommands={"value": []}), "at least one command", id="commands-empty"
        ),
        pytest.param(
            _params(location={"reference": {}}),
            "location.value: missing key",
            id="keyvault-reference",
        ),
        pytest.param(
            _params(storageAccountName={"value": "My_Storage"}),
            "storage account name 'My_Storage' is not valid",
            id="storage-chars",
        ),
        pytest.param(
            _params(storageAccountName={"value": "a" * 25}),
            "has 25 characters; it must have 3-24",
            id="storage-long",
        ),
        pytest.param(_params(fileShareName={"value": "ab"}), "must have 3-63", id="share-short"),
        pytest.param(
            _params(fileShareName={"value": "my--share"}), "double hyphen", id="share-double-hyphen"
        ),
        pytest.param(
            _params(acaAppName={"value": "1app"}),
            "does not start with a letter",
            id="app-digit-first",
        ),
        pytest.param(
            _params(acaAppName={"value": "app-"}), "ends with a hyphen", id="app-trailing-hyphen"
        ),
        pytest.param(_params(acaAppName={"value": "a" * 33}), "must have 2-32", id="app-long"),
    ],
)
def test_parameters_errors_name_file_line_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "inference.parameters.json"
    path.write_text(text)
    with pytest.raises(InfraFileError) as info:
        load_parameters(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_parameter_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    text = _params(maximumInstanceCount={"value": 0})
    path.write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "maximumInstanceCount" in ln)
    with pytest.raises(InfraFileError, match=f"line {line}: parameters.maximumInstanceCount"):
        load_parameters(path)


def test_default_parameters_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(InferenceParameters.default().to_json())
    params = load_parameters(path)
    assert tuple(params.values()) == PARAMETER_NAMES
    assert all(v is None for v in params.names().values())
    # omitted parameters take the template's defaults, as ARM does
    path.write_text('{"parameters": {"maximumInstanceCount": {"value": 3}}}')
    assert load_parameters(path).values()["maximumInstanceCount"] == 3


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param({"SUBSCRIPTION_ID": "x"}, "RESOURCE_GROUP_NAME: missing key", id="missing"),
        pytest.param(
            {k: "x1" for k in CONFIG_KEYS} | {"ACA_APP_ENDPIONT": "x"},
            "unknown key 'ACA_APP_ENDPIONT'",
            id="typo",
        ),
        pytest.param(
            {k: None for k in CONFIG_KEYS} | {"RESOURCE_GROUP_NAME": 3},
            "RESOURCE_GROUP_NAME: Input should be a valid string (got a number: 3)",
            id="wrong-type",
        ),
        pytest.param({k: "<your-value>" for k in CONFIG_KEYS}, "placeholder", id="placeholder"),
        pytest.param(
            {k: "abc" for k in CONFIG_KEYS} | {"STORAGE_ACCOUNT_NAME": "Bad-Name"},
            "STORAGE_ACCOUNT_NAME: storage account name 'Bad-Name'",
            id="azure-storage",
        ),
        pytest.param(
            {k: "abc" for k in CONFIG_KEYS} | {"PROVIDER": "gcp"},
            "PROVIDER: Input should be 'local' or 'azure'",
            id="provider",
        ),
    ],
)
def test_config_errors(tmp_path: Path, config: dict[str, Any], expected: str) -> None:
    path = tmp_path / "inference.config.json"
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(InfraFileError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_config_with_nulls_asks_for_provision(tmp_path: Path) -> None:
    path = tmp_path / "inference.config.json"
    path.write_text(json.dumps({k: None for k in CONFIG_KEYS} | {"SUBSCRIPTION_ID": "s"}))
    with pytest.raises(NotProvisionedError, match="RESOURCE_GROUP_NAME, .* are null.*provision"):
        load_complete_config(path)
    with pytest.raises(NotProvisionedError, match="not found"):
        load_complete_config(tmp_path / "absent.json")


def test_config_endpoint_from_bare_fqdn(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    values = {k: "abc" for k in CONFIG_KEYS} | {
        "ACA_APP_ENDPOINT": "app.region.azurecontainerapps.io"
    }
    path.write_text(json.dumps(values))
    assert load_config(path).endpoint_url == "https://app.region.azurecontainerapps.io"


@pytest.mark.parametrize(
    ("parts", "expected"),
    [  # published vectors of a public reimplementation checked against Bicep
        (("test",), "rbgf3xv4ufgzg"),
        (("hello", "world"), "a7wkljktk6wne"),
        (("abc",), "cgtzqvhu4i23s"),
        (
            ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/my-rg",),
            "bmg7c6xu4tw46",
        ),
        (("foo", "bar", "baz"), "xzi4ioaxtmth4"),
    ],
)
def test_unique_string(parts: tuple[str, ...], expected: str) -> None:
    assert naming.unique_string(*parts) == expected


def test_derived_names_are_valid_and_deterministic() -> None:
    names = naming.derived_names("00000000-0000-0000-0000-000000000000", "my-rg")
    assert names.storageAccountName == "aistoragebmg7c"
    assert names == naming.derived_names("00000000-0000-0000-0000-000000000000", "my-rg")
    for param, rule in naming.RULES_BY_PARAMETER.items():
        assert rule.check(getattr(names, param)) is None


# --- init -------------------------------------------------------------------------------------


def test_init_scaffolds_and_never_overwrites_without_force(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    ws = tmp_path / "ws"
    (ws).mkdir()
    (ws / "README.md").write_text("# My project\n\nMine.\n")
    out = cli("init", ws).stdout
    assert "created  infra/provision/inference.parameters.json" in out
    params = load_parameters(ws / "infra" / "provision" / "inference.parameters.json")
    assert tuple(params.values()) == PARAMETER_NAMES
    config = json.loads((ws / "infra" / "inference.config.json").read_text())
    assert config == {k: None for k in CONFIG_KEYS}
    assert (ws / "infra" / "provision" / "inference.bicep").read_text().startswith("// tuneserve")
    readme = (ws / "README.md").read_text()
    assert readme.startswith("# My project\n\nMine.\n") and "What to fill in" in readme

    (ws / "infra" / "inference.config.json").write_text('{"mine": 1}')
    out = cli("init", ws).stdout
    assert "kept" in out
    assert (ws / "infra" / "inference.config.json").read_text() == '{"mine": 1}'
    assert (ws / "README.md").read_text() == readme  # the section is not added twice

    cli("init", ws, "--force")
    assert json.loads((ws / "infra" / "inference.config.json").read_text())["ACA_APP_NAME"] is None
    assert (ws / "README.md").read_text().count("What to fill in") == 1


# --- provision --------------------------------------------------------------------------------


def test_provision_local_uses_finetuning_names_and_derived_defaults(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    ws = tmp_path / "ws"
    cli("init", ws)
    (ws / "infra" / "finetuning.config.json").write_text(
        json.dumps(
            {
                "SUBSCRIPTION_ID": "sub",
                "RESOURCE_GROUP_NAME": "rg",
                "STORAGE_ACCOUNT_NAME": "ftstorage",
                "FILE_SHARE_NAME": "ft-share",
                "ACA_JOB_NAME": "job",
                "COMMANDS": ["cd /mount"],
            }
        )
    )
    cli("provision", "-w", ws, "--provider", "local", "--port", "45678")
    config = load_complete_config(ws / "infra" / "inference.config.json")
    assert config.PROVIDER == "local" and config.SUBSCRIPTION_ID == "local"
    assert config.FILE_SHARE_NAME == "ft-share"  # the fine-tuning step's share
    assert config.ACA_APP_NAME == naming.derived_names("local", "local").acaAppName
    assert config.ACA_APP_ENDPOINT == "http://127.0.0.1:45678"
    assert (ws / ".tuneserve" / "storage" / "ft-share").is_dir()
    assert cli("endpoint", "-w", ws).stdout.strip().splitlines()[-1] == "http://127.0.0.1:45678"


def test_provision_names_the_missing_flag_without_a_terminal(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    ws = tmp_path / "ws"
    cli("init", ws)
    result = cli("provision", "-w", ws, "--provider", "azure", ok=False)
    assert "pass --subscription" in result.stderr
    result = cli("provision", "-w", ws, "--provider", "azure", "--subscription", "s", ok=False)
    assert "pass --resource-group" in result.stderr


def test_provision_rejects_an_invalid_parameters_file(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    ws = tmp_path / "ws"
    cli("init", ws)
    (ws / "infra" / "provision" / "inference.parameters.json").write_text(
        _params(acaAppName={"value": "Bad_App"})
    )
    result = cli("provision", "-w", ws, "--provider", "local", ok=False)
    assert "infra/provision/inference.parameters.json: line" in result.stderr
    assert "container app name 'Bad_App' is not valid" in result.stderr
    result = cli("deploy", "-w", ws, ok=False)
    assert "are null" in result.stderr and "tuneserve provision" in result.stderr


def test_provision_without_init(tmp_path: Path, cli: Callable[..., Any]) -> None:
    result = cli("provision", "-w", tmp_path, "--provider", "local", ok=False)
    assert "run 'tuneserve init' first" in result.stderr
