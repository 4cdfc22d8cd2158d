"""Adapters at runtime on a live server: POST/DELETE/GET /v1/adapters, atomic replace under a
running request, path escapes, the admin key, on-demand loads by name and rescans of the root.

The demo's `capitals` and `pirate` adapters are copied into a temporary adapter root under other
names; each answers its trained questions exactly under greedy decoding, so an answer tells
which adapter's weights produced it.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import TEST_ENGINE
from tests.server.conftest import metric_value
from tuneserve.models.demo import ADAPTER_EXAMPLES

STATES = ("hot", "cpu", "disk")
ADMIN = "admin-key"
LONG = {"ignore_eos": True}  # a generation that runs its whole max_tokens
USER = "user-key"
CAPITAL_Q, CAPITAL_A = ADAPTER_EXAMPLES["capitals"][0]
PIRATE_Q, PIRATE_A = ADAPTER_EXAMPLES["pirate"][0]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, demo_paths: Any) -> Path:
    root = tmp_path_factory.mktemp("share") / "models"
    root.mkdir()
    return root


def put(demo_paths: Any, source: str, dest: Path) -> Path:
    """Copy a demo adapter folder to `dest` (replacing it), as a push would."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(demo_paths.adapters[source], dest)
    return dest


@pytest.fixture(scope="module")
def server(demo_server_factory: Callable[..., Any], root: Path) -> Any:
    """Keys on, one hot LoRA slot (so several adapters must take turns), rescans on demand only
    (an hour apart) so each test decides when the root is looked at."""
    return demo_server_factory(
        api_key=USER,
        ui=False,
        adapters={},
        app={"admin_key": ADMIN, "adapter_root": root, "rescan_interval": 3600},
        engine={"max_loras": 1},
    )


@pytest.fixture(scope="module")
def admin(server: Any) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=server.api_url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.api_url, api_key=USER, max_retries=0, timeout=120) as c:
        yield c


def ask(client: openai.OpenAI, model: str, messages: list[Any], **extra: Any) -> str:
    extra.setdefault("max_tokens", 40)
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, **extra)
    return reply.choices[0].message.content or ""


def served(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    body = admin.get("/adapters").json()
    return {card["name"]: card for card in body["data"]}


def test_load_chat_replace_under_a_running_request_then_unload(
    server: Any, admin: httpx.Client, client: openai.OpenAI, demo_paths: Any, root: Path
) -> None:
    put(demo_paths, "capitals", root / "support-v1")
    put(demo_paths, "pirate", root / "support-v2")

    loaded = admin.post("/adapters", json={"name": "support", "path": "support-v1"})
    assert loaded.status_code == 200, loaded.text
    card = loaded.json()
    assert card["name"] == "support" and card["replaced"] is False
    assert card["source"] == "api" and card["rank"] > 0 and card["size_bytes"] > 0
    assert card["target_modules"] and Path(card["path"]) == (root / "support-v1").resolve()
    assert "support" in [m.id for m in client.models.list().data]
    assert ask(client, "support", CAPITAL_Q) == CAPITAL_A

    # A long generation on v1, with the replace landing while it runs.
    long_messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me a story."}
    ]
    reference = ask(client, "support", long_messages, max_tokens=160, extra_body=LONG)
    chunks: list[str] = []
    finish: list[str | None] = []
    first_chunk = threading.Event()

    def stream_v1() -> None:
        stream = client.chat.completions.create(
            model="support",
            messages=long_messages,
            temperature=0,
            stream=True,
            max_tokens=160,
            extra_body=LONG,
        )
        for chunk in stream:
            if chunk.choices:
                chunks.append(chunk.choices[0].delta.content or "")
                # the role chunk comes before the engine admits the request: wait for a token
                if chunk.choices[0].delta.content:
                    first_chunk.set()
                if chunk.choices[0].finish_reason:
                    finish.append(chunk.choices[0].finish_reason)

    runner = threading.Thread(target=stream_v1)
    runner.start()
    assert first_chunk.wait(60)
    swapped = admin.post("/adapters", json={"name": "support", "path": "support-v2"})
    still_running = not finish
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["replaced"] is True
    assert ask(client, "support", PIRATE_Q) == PIRATE_A  # new requests: the new weights
    runner.join(120)
    assert still_running, "the request ended before the replace: make it longer"
    assert finish == ["length"]
    assert "".join(chunks) == reference  # finished on the old weights, cleanly

    deleted = admin.delete("/adapters/support")
    assert deleted.status_code == 200 and deleted.json() == {
        "name": "support",
        "object": "adapter",
        "deleted": True,
    }
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, "support", PIRATE_Q)
    assert "support" in str(missing.value) and str(root.resolve()) in str(missing.value)
    assert admin.delete("/adapters/support").status_code == 404


@pytest.mark.parametrize(
    "path, says",
    [
        pytest.param("../outside", "'..'", id="dot-dot"),
        pytest.param("sub/../../outside", "'..'", id="dot-dot-inside"),
        pytest.param("/etc", "outside the adapter root", id="absolute-elsewhere"),
        pytest.param("escape-link", "through a symlink", id="symlink-out"),
        pytest.param("no-such-folder", "no folder", id="missing"),
    ],
)
def test_paths_outside_the_root_are_refused(
    admin: httpx.Client, root: Path, demo_paths: Any, path: str, says: str
) -> None:
    outside = put(demo_paths, "capitals", root.parent / "outside")
    link = root / "escape-link"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    response = admin.post("/adapters", json={"name": "sneaky", "path": path})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "path" and says in error["message"]
    assert "sneaky" not in served(admin)


def test_an_absolute_path_inside_the_root_is_accepted(
    admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    folder = put(demo_paths, "capitals", root / "absolute-ok")
    response = admin.post("/adapters", json={"name": "absolute", "path": str(folder)})
    assert response.status_code == 200, response.text
    assert ask(client, "absolute", CAPITAL_Q) == CAPITAL_A
    assert admin.delete("/adapters/absolute").status_code == 200


@pytest.mark.parametrize(
    "body, param, says",
    [
        pytest.param({"name": "bad name", "path": "x"}, "name", "not accepted", id="space"),
        pytest.param({"name": "../x", "path": "x"}, "name", "not accepted", id="slash"),
        pytest.param({"name": "<base>", "path": "x"}, "name", "base model", id="base"),
        pytest.param({"name": "x"}, "path", "required", id="no-path"),
    ],
)
def test_bad_names_and_bodies_are_400_naming_the_field(
    admin: httpx.Client, server: Any, body: dict[str, str], param: str, says: str
) -> None:
    if body.get("name") == "<base>":
        body = {**body, "name": server.app.state.generation.served.base_name}
    response = admin.post("/adapters", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_a_broken_adapter_is_refused_and_nothing_else_changes(
    admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    good = put(demo_paths, "capitals", root / "steady")
    assert admin.post("/adapters", json={"name": "steady", "path": "steady"}).status_code == 200
    broken = put(demo_paths, "capitals", root / "broken")
    (broken / "adapter_config.json").write_text("{ not json")
    response = admin.post("/adapters", json={"name": "steady", "path": "broken"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "path" and "adapter_config.json" in error["message"]
    assert served(admin)["steady"]["path"] == str(good.resolve())
    assert ask(client, "steady", CAPITAL_Q) == CAPITAL_A
    shutil.rmtree(broken)
    assert admin.delete("/adapters/steady").status_code == 200


def test_admin_routes_need_the_admin_key(server: Any, client: openai.OpenAI) -> None:
    url = server.api_url + "/adapters"
    assert httpx.get(url).status_code == 401
    user = httpx.get(url, headers={"Authorization": f"Bearer {USER}"})
    assert user.status_code == 401 and "admin key" in user.json()["error"]["message"]
    refused = httpx.post(
        url, json={"name": "x", "path": "x"}, headers={"Authorization": "Bearer wrong"}
    )
    assert refused.status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert client.models.list().data  # the user key still works where it should
    admin_as_user = httpx.get(
        server.api_url + "/models", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert admin_as_user.status_code == 200


def test_a_folder_pushed_to_the_root_is_served_on_demand_by_name(
    admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    put(demo_paths, "pirate", root / "parrot")
    # no POST, no rescan: the request itself finds it
    assert ask(client, "parrot", PIRATE_Q) == PIRATE_A
    assert served(admin)["parrot"]["source"] == "share"
    assert "parrot" in [m.id for m in client.models.list().data]


def test_rescan_follows_the_share_add_change_and_delete(
    admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    put(demo_paths, "capitals", root / "rolling")
    listed = admin.post("/adapters/rescan").json()
    assert "rolling" in {card["name"] for card in listed["data"]}
    assert ask(client, "rolling", CAPITAL_Q) == CAPITAL_A
    put(demo_paths, "pirate", root / "rolling")  # new files: new change times
    admin.post("/adapters/rescan")
    assert ask(client, "rolling", PIRATE_Q) == PIRATE_A
    shutil.rmtree(root / "rolling")
    admin.post("/adapters/rescan")
    assert "rolling" not in served(admin)
    with pytest.raises(openai.NotFoundError):
        ask(client, "rolling", PIRATE_Q)


def test_an_unreachable_root_unloads_nothing(
    admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    put(demo_paths, "capitals", root / "kept")
    assert "kept" in {card["name"] for card in admin.post("/adapters/rescan").json()["data"]}
    away = root.with_name("models-away")
    root.rename(away)  # the share drops out for a moment
    try:
        assert "kept" in {c["name"] for c in admin.post("/adapters/rescan").json()["data"]}
        assert ask(client, "kept", CAPITAL_Q) == CAPITAL_A
    finally:
        away.rename(root)
    shutil.rmtree(root / "kept")
    admin.post("/adapters/rescan")
    assert "kept" not in served(admin)


def test_a_bad_folder_in_the_share_is_reported_not_served(
    admin: httpx.Client, root: Path, demo_paths: Any
) -> None:
    bad = put(demo_paths, "capitals", root / "half-written")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    body = admin.post("/adapters/rescan").json()
    errors = {e["name"]: e for e in body["errors"]}
    assert (
        "half-written" in errors
        and "adapter_model.safetensors" in errors["half-written"]["message"]
    )
    assert "half-written" not in {card["name"] for card in body["data"]}
    shutil.rmtree(bad)
    body = admin.post("/adapters/rescan").json()
    assert "half-written" not in {e["name"] for e in body["errors"]}


def test_more_adapters_than_hot_slots_all_answer_right(
    server: Any, admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    """max_loras=1: four adapters asked at once take turns in the one slot (LRU)."""
    kinds = {"lru-cap-a": "capitals", "lru-pir-a": "pirate", "lru-cap-b": "capitals"}
    kinds["lru-pir-b"] = "pirate"
    for name, kind in kinds.items():
        put(demo_paths, kind, root / name)
    admin.post("/adapters/rescan")
    questions = {"capitals": (CAPITAL_Q, CAPITAL_A), "pirate": (PIRATE_Q, PIRATE_A)}
    answers: dict[str, str] = {}

    def run(name: str) -> None:
        answers[name] = ask(client, name, questions[kinds[name]][0])

    threads = [threading.Thread(target=run, args=(name,)) for name in kinds for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == {name: questions[kind][1] for name, kind in kinds.items()}
    states = {name: served(admin)[name]["state"] for name in kinds}
    # the simple engine (PEFT) keeps every adapter in the model: all hot, no slots
    hot = 1 if TEST_ENGINE == "continuous" else len(served(admin))
    assert list(states.values()).count("hot") == min(hot, len(kinds)), states
    assert all(served(admin)[name]["last_used"] for name in kinds)
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert metric_value(metrics, "tuneserve_adapters", state="hot") == hot
    everything = sum(metric_value(metrics, "tuneserve_adapters", state=s) for s in STATES)
    assert everything == len(served(admin))


def test_vllm_runtime_lora_routes_work_too(
    admin: httpx.Client, client: openai.OpenAI, root: Path, demo_paths: Any
) -> None:
    put(demo_paths, "capitals", root / "vllm-style")
    loaded = admin.post("/load_lora_adapter", json={"lora_name": "vl", "lora_path": "vllm-style"})
    assert loaded.status_code == 200 and "Success" in loaded.text
    assert ask(client, "vl", CAPITAL_Q) == CAPITAL_A
    unloaded = admin.post("/unload_lora_adapter", json={"lora_name": "vl"})
    assert unloaded.status_code == 200
    missing = admin.post("/unload_lora_adapter", json={"lora_name": "vl"})
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/adapters"),
        ("POST", "/adapters"),
        ("DELETE", "/adapters/capitals"),
        ("POST", "/adapters/rescan"),
        ("POST", "/load_lora_adapter"),
        ("POST", "/unload_lora_adapter"),
    ],
)
def test_with_no_key_the_admin_routes_are_closed(demo_server: Any, method: str, path: str) -> None:
    """Secure by default: a server started without keys cannot be changed by anyone."""
    body = {"name": "x", "path": "x"} if method == "POST" else None
    response = httpx.request(method, demo_server.api_url + path, json=body, timeout=30)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert "--admin-key" in error["message"] and "--open-admin" in error["message"]
    # nothing changed, and the API itself stays open on a keyless server
    models = httpx.get(demo_server.api_url + "/models", timeout=30).json()["data"]
    assert "capitals" in {m["id"] for m in models}


def test_open_admin_opens_them_and_without_a_root_loads_are_refused_clearly(
    demo_server_factory: Callable[..., Any],
) -> None:
    opened = demo_server_factory(ui=False, app={"open_admin": True})
    response = httpx.post(opened.api_url + "/adapters", json={"name": "x", "path": "x"}, timeout=30)
    assert response.status_code == 400
    assert "--adapter-root" in response.json()["error"]["message"]
    listing = httpx.get(opened.api_url + "/adapters", timeout=30).json()
    assert listing["root"] is None and {c["name"] for c in listing["data"]} >= {"capitals"}
    opened.stop()
