"""The server alone, driven by an Engine with no model (tests/server/fake_engine.py): the
routes, streaming and the adapter registry see only the Engine interface, so what they do can
be checked in-process, and the registry's races made to happen on purpose."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.engine.tiny import build_tokenizer
from tests.server.fake_engine import BASE, VOCAB, FakeEngine, fake_served, write_adapter
from tuneserve.errors import RegistryError
from tuneserve.models.adapter_root import AdapterRoot
from tuneserve.models.adapters import read_adapter_spec
from tuneserve.models.types import ServedModel
from tuneserve.server.adapter_registry import AdapterRegistry
from tuneserve.server.app import create_app

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_adapter(root / "alpha")
    return root


@pytest.fixture
def served(tokenizer: Any, root: Path) -> ServedModel:
    return fake_served(tokenizer, {"alpha": read_adapter_spec("alpha", root / "alpha")})


@pytest.fixture
def engine(served: ServedModel) -> FakeEngine:
    return FakeEngine(served.adapters)


@pytest.fixture
def client(served: ServedModel, engine: FakeEngine, root: Path) -> Iterator[TestClient]:
    app = create_app(
        served, engine, ui=False, adapter_root=root, rescan_interval=0, open_admin=True
    )
    with TestClient(app) as client:  # runs the lifespan: the engine starts and stops
        yield client
    assert not engine.is_running


def test_models_lists_the_base_and_what_the_engine_serves(client: TestClient) -> None:
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [(BASE, None), ("alpha", BASE)]


def test_a_chat_completion_sends_the_templated_prompt_and_returns_the_engine_words(
    client: TestClient, engine: FakeEngine, tokenizer: Any
) -> None:
    body = client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": HELLO, "max_tokens": 10}
    ).json()
    text = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    prompt = tuple(tokenizer.encode(text, add_special_tokens=False))
    [request] = engine.requests
    assert (request.adapter, request.prompt_ids, request.params.max_tokens) == ("alpha", prompt, 10)
    assert body["choices"][0]["message"]["content"] == f"alpha heard {len(prompt)} tokens"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), 4)


def test_max_tokens_ends_with_length(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": HELLO, "max_tokens": 2}
    ).json()
    assert body["choices"][0]["message"]["content"] == f"{BASE} heard"
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_stream_carries_every_delta_then_done(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": BASE, "messages": HELLO, "max_tokens": 10, "stream": True},
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith(f"{BASE} heard ") and text.endswith(" tokens")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) <= {None}


def test_prompt_ids_are_checked_against_the_engine_vocabulary(
    client: TestClient, engine: FakeEngine
) -> None:
    response = client.post(
        "/v1/completions", json={"model": BASE, "prompt": [1, VOCAB], "max_tokens": 4}
    )
    assert response.status_code == 400
    assert f"Token id {VOCAB} in 'prompt' is out of range" in response.json()["error"]["message"]
    assert engine.requests == []


def test_an_unknown_model_is_a_404_naming_the_served_ones(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", json={"model": "nobody", "messages": HELLO, "max_tokens": 4}
    )
    assert response.status_code == 404
    assert "alpha" in response.json()["error"]["message"]


def test_adapters_load_replace_and_unload_through_the_api(
    client: TestClient, engine: FakeEngine, root: Path
) -> None:
    write_adapter(root / "beta-v1", rank=2)
    write_adapter(root / "beta-v2", rank=8)
    first = client.post("/v1/adapters", json={"name": "beta", "path": "beta-v1"}).json()
    second = client.post("/v1/adapters", json={"name": "beta", "path": "beta-v2"}).json()
    assert (first["replaced"], first["rank"]) == (False, 2)
    assert (second["replaced"], second["rank"]) == (True, 8)
    assert "beta" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    body = client.post(
        "/v1/chat/completions", json={"model": "beta", "messages": HELLO, "max_tokens": 1}
    ).json()
    assert body["choices"][0]["message"]["content"] == "beta"

    assert client.delete("/v1/adapters/beta").json()["deleted"] is True
    assert "beta" not in engine.adapters
    assert [(verb, name) for verb, name, _ in engine.changes] == [
        ("add", "beta"),
        ("add", "beta"),
        ("remove", "beta"),
    ]
    assert client.delete("/v1/adapters/beta").status_code == 404


def test_an_adapter_the_engine_refuses_is_a_400_with_the_engine_reason(
    client: TestClient, engine: FakeEngine, root: Path
) -> None:
    write_adapter(root / "wide")
    engine.refuse["wide"] = "q_proj needs [4, 64], the file holds [4, 128]"
    response = client.post("/v1/adapters", json={"name": "wide", "path": "wide"})
    assert response.status_code == 400
    assert "q_proj needs [4, 64]" in response.json()["error"]["message"]
    assert "wide" not in engine.adapters and engine.changes == []


# -- the registry alone, its changes made to overlap ------------------------------------------
def registry_for(engine: FakeEngine, served: ServedModel, root: Path) -> AdapterRegistry:
    return AdapterRegistry(engine, served, root=AdapterRoot.at(root), rescan_interval=0)


def test_an_unload_asked_during_a_load_waits_for_it_and_wins(
    engine: FakeEngine, served: ServedModel, root: Path
) -> None:
    write_adapter(root / "beta")
    registry = registry_for(engine, served, root)

    async def main() -> None:
        engine.hold.clear()
        loading = asyncio.create_task(registry.load("beta", "beta"))
        assert await asyncio.to_thread(engine.entered.wait, 10)  # inside add_adapter now
        unloading = asyncio.create_task(registry.unload("beta"))
        await asyncio.sleep(0.05)
        assert not unloading.done()  # one change at a time: it waits for the load's lock
        engine.hold.set()
        (_, replaced), _ = await asyncio.gather(loading, unloading)
        assert not replaced

    asyncio.run(main())
    assert "beta" not in engine.adapters
    assert [(verb, name) for verb, name, _ in engine.changes] == [
        ("add", "beta"),
        ("remove", "beta"),
    ]


def test_a_refused_new_version_leaves_the_old_one_serving(
    engine: FakeEngine, served: ServedModel, root: Path
) -> None:
    write_adapter(root / "v1")
    write_adapter(root / "v2")
    registry = registry_for(engine, served, root)

    async def main() -> None:
        await registry.load("beta", "v1")
        engine.refuse["beta"] = "trained for another base"
        with pytest.raises(RegistryError, match="trained for another base"):
            await registry.load("beta", "v2")

    asyncio.run(main())
    assert engine.adapters["beta"].path == (root / "v1").resolve()


def test_a_rescan_serves_new_folders_and_unloads_removed_ones(
    engine: FakeEngine, served: ServedModel, root: Path
) -> None:
    registry = registry_for(engine, served, root)
    write_adapter(root / "gamma")
    asyncio.run(registry.rescan())
    assert {i.name: i.source for i in registry.infos()} == {"alpha": "startup", "gamma": "share"}

    (root / "gamma" / "adapter_config.json").unlink()
    asyncio.run(registry.rescan())
    assert sorted(engine.adapters) == ["alpha"]
    assert engine.changes[-1][:2] == ("remove", "gamma")
