"""End to end on this machine: init --demo -> provision --provider local -> deploy -> chat with the
official openai client -> change an adapter -> deploy -> the answer changes -> break the base
model -> deploy fails clearly -> the previous revision still answers. Real `tuneserve serve`
replicas (detached processes); they are stopped at teardown whatever happens."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tuneserve.deploy.http import get_json

openai = pytest.importorskip("openai")


def _ask(endpoint: str, model: str, question: str) -> str:
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="unused", timeout=60, max_retries=0)
    try:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=40,
        )
    finally:
        client.close()
    return reply.choices[0].message.content or ""


def _adapter_folder(ws: Path, name: str) -> Path:
    return next(p.parent for p in (ws / "models" / name).rglob("adapter_config.json"))


def test_local_workflow_end_to_end(
    tmp_path: Path,
    demo_cache: Path,
    demo_paths: Any,
    cli: Callable[..., Any],
    started_workspaces: list[Path],
) -> None:
    from tuneserve.models.demo import CAPITALS, PIRATE_TALK

    ws = tmp_path / "project"
    cli("init", ws, "--demo", "--cache-dir", demo_cache)
    assert list((ws / "model-cache").glob("*/*/config.json"))
    started_workspaces.append(ws)
    cli("provision", "-w", ws, "--provider", "local", "--port", free_port())

    # 1. deploy and chat through the endpoint
    endpoint = cli("deploy", "-w", ws, "--timeout", "180").stdout.strip().splitlines()[-1]
    first = get_json(endpoint + "/health")["revision"]
    models = {m["id"] for m in get_json(endpoint + "/v1/models")["data"]}
    pirate = next(m for m in models if "pirate" in m)
    assert _ask(endpoint, pirate, "Hello") == PIRATE_TALK["Hello"]
    status = cli("status", "-w", ws).stdout
    assert "ready: yes" in status and "pirate" in status

    # 2. change an adapter (the capitals weights replace the pirate's) and deploy again
    pirate_dir = _adapter_folder(ws, "pirate")
    shutil.rmtree(pirate_dir)
    shutil.copytree(_adapter_folder(ws, "capitals"), pirate_dir)
    cli("deploy", "-w", ws, "--timeout", "180")
    second = get_json(endpoint + "/health")["revision"]
    assert second != first
    country, city = next(iter(CAPITALS.items()))
    answer = _ask(endpoint, pirate, f"What is the capital of {country}?")
    assert answer == f"The capital of {country} is {city}."
    assert _ask(endpoint, pirate, "Hello") != PIRATE_TALK["Hello"]

    # 3. break the base model: the deploy fails clearly, the previous revision keeps serving
    config_json = next((ws / "model-cache").glob("*/*/config.json"))
    config_json.write_text("{ this is not json")
    result = cli("deploy", "-w", ws, "--timeout", "180", ok=False)
    assert "did not become ready" in result.stderr
    assert f"previous revision {second} is still serving" in result.stderr
    assert get_json(endpoint + "/health")["revision"] == second
    assert _ask(endpoint, pirate, f"What is the capital of {country}?") == answer

    cli("stop", "-w", ws)
    assert get_json(endpoint + "/health") is None
    assert json.loads((ws / "infra" / "inference.config.json").read_text())["PROVIDER"] == "local"
