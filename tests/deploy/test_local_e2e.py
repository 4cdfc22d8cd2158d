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

from tuneserve.deploy.http import get_json

openai = pytest.importorskip("openai")

# Tokens per long stream in the lossless-deploy test: long enough to outlast the new revision's
# start (about 20 s here, slowed by the streams themselves), short enough to end within the
# drain that follows (30 s): here they end about 8 s after the switch.
LONG_TOKENS = 900


def _ask(endpoint: str, model: str, question: str, key: str) -> str:
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key=key, timeout=60, max_retries=0)
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
    cli: Callable[..., Any], toy_deployment: Callable[[], tuple[Path, str, str]]
) -> None:
    from tuneserve.models.demo import CAPITALS, PIRATE_TALK

    # 1. init --demo, provision, deploy, and chat with the key provision made
    ws, endpoint, key = toy_deployment()
    assert list((ws / "model-cache").glob("*/*/config.json"))
    first = get_json(endpoint + "/health")["revision"]
    models = {m["id"] for m in get_json(endpoint + "/v1/models", api_key=key)["data"]}
    pirate = next(m for m in models if "pirate" in m)
    # a deployed endpoint always has keys: nothing answers /v1 without one
    with pytest.raises(openai.AuthenticationError):
        _ask(endpoint, pirate, "Hello", "not-the-key")
    assert _ask(endpoint, pirate, "Hello", key) == PIRATE_TALK["Hello"]
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
    answer = _ask(endpoint, pirate, f"What is the capital of {country}?", key)
    assert answer == f"The capital of {country} is {city}."
    assert _ask(endpoint, pirate, "Hello", key) != PIRATE_TALK["Hello"]

    # 3. break the base model: the deploy fails clearly, the previous revision keeps serving
    config_json = next((ws / "model-cache").glob("*/*/config.json"))
    config_json.write_text("{ this is not json")
    result = cli("deploy", "-w", ws, "--timeout", "180", "--include-model-cache", ok=False)
    assert "did not become ready" in result.stderr
    assert f"previous revision {second} is still serving" in result.stderr
    assert get_json(endpoint + "/health")["revision"] == second
    assert _ask(endpoint, pirate, f"What is the capital of {country}?", key) == answer

    cli("stop", "-w", ws)
    assert get_json(endpoint + "/health") is None
    assert json.loads((ws / "infra" / "inference.config.json").read_text())["PROVIDER"] == "local"


def test_a_local_deploy_loses_no_request(
    cli: Callable[..., Any], toy_deployment: Callable[[], tuple[Path, str, str]]
) -> None:
    """Long streams across `tuneserve deploy` all finish (the old revision drains them after the
    switch); short requests sent all through the deploy all succeed.

    Four clients stream back to back from before the deploy until it is over, so some stream is
    running when the switch comes however fast the engine is (a fixed number of streams once
    finished before a slow switch)."""
    import threading
    import time

    ws, endpoint, key = toy_deployment()
    first = get_json(endpoint + "/health")["revision"]
    base = next(m["id"] for m in get_json(endpoint + "/v1/models", api_key=key)["data"])
    # The official client as users run it: its default retries (a 503 from a draining replica
    # is retried, with Retry-After, on a fresh connection, which reaches the new revision).
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key=key, timeout=120)

    # (started, ended, finish_reason, tokens) per long stream
    long_done: list[tuple[float, float, str | None, int]] = []
    errors: list[BaseException] = []
    streaming = threading.Event()  # set until the deploy is over

    def long_streams() -> None:
        while streaming.is_set() and not errors:
            long_stream()

    def long_stream() -> None:
        began = time.monotonic()
        try:
            stream = client.chat.completions.create(
                model=base,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=LONG_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish, tokens = None, 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            long_done.append((began, time.monotonic(), finish, tokens))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    short_ok: list[str] = []  # the revision that answered /health just after each success
    switched_at: list[float] = []
    deploying = threading.Event()

    def short_requests() -> None:
        while deploying.is_set():
            try:
                reply = client.chat.completions.create(
                    model=base,
                    messages=[{"role": "user", "content": "Hello"}],
                    max_tokens=4,
                    temperature=0,
                )
                assert reply.choices[0].message.content is not None
                short_ok.append((get_json(endpoint + "/health") or {}).get("revision", "?"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            time.sleep(0.2)

    def watch_switch() -> None:
        # a new connection each time: what the proxy routes new connections to
        while deploying.is_set() and not switched_at:
            health = get_json(endpoint + "/health", timeout=2) or {}
            if health.get("revision") not in (None, first):
                switched_at.append(time.monotonic())
            time.sleep(0.1)

    streaming.set()
    longs = [threading.Thread(target=long_streams) for _ in range(4)]
    for thread in longs:
        thread.start()
    time.sleep(1.0)  # the streams are running before the deploy starts
    deploying.set()
    shorts = threading.Thread(target=short_requests)
    shorts.start()
    watcher = threading.Thread(target=watch_switch)
    watcher.start()
    started = time.monotonic()
    try:
        result = cli("deploy", "-w", ws, "--timeout", "180")
    finally:
        took = time.monotonic() - started
        deploying.clear()
        streaming.clear()
        shorts.join(timeout=120)
        watcher.join(timeout=10)
        for thread in longs:
            thread.join(timeout=120)
        client.close()

    second = get_json(endpoint + "/health")["revision"]
    assert second != first
    assert not errors, errors
    assert len(long_done) >= 4
    assert all(finish == "length" and n == LONG_TOKENS for *_, finish, n in long_done), long_done
    assert switched_at, "the endpoint never reported the new revision during the deploy"
    # streams running when traffic moved to the new revision finished on the old one, draining
    across = [(b, e) for b, e, _, _ in long_done if b < switched_at[0] < e]
    assert across, (long_done, switched_at)
    assert first in short_ok and second in short_ok
    assert "Retiring the previous revision" in result.stderr
    print(
        f"deploy under load: {took:.1f} s; {len(short_ok)} short requests ok; "
        f"{len(long_done)} long streams, {len(across)} across the switch (ended "
        f"{[round(e - switched_at[0], 1) for _, e in across]} s after it), which came "
        f"{switched_at[0] - started:.1f} s into the deploy"
    )
