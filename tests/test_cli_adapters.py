"""`tuneserve adapters list | push | remove` against real `tuneserve serve` processes.

Two servers share one adapter root (as replicas share the file share): one push reaches both,
each answers with the pushed adapter through the official openai client, a second push replaces
it everywhere, and remove makes both answer 404. The servers rescan only on demand here
(--adapter-rescan-interval 0), so each server has the adapter because the CLI told it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import free_port
from tuneserve.cli import app

openai = pytest.importorskip("openai")

KEY = "admin-test-key"
NAME = "capitals-live"


@dataclass
class Replicas:
    urls: list[str]
    root: Path  # the adapter root both servers share


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server {url} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server {url} not ready in time:\n{log.read_text()}")


@pytest.fixture(scope="module")
def replicas(
    demo_paths: Any, demo_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Two demo servers, one adapter root (<tmp>/share/models), admin via --api-key KEY."""
    share = tmp_path_factory.mktemp("share")
    root = share / "models"
    root.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    urls, logs = [], []
    try:
        for i in range(2):
            port = free_port()
            log = share.parent / f"{share.name}-server-{i}.log"
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, "-m", "tuneserve", "serve"),
                            *("--base", str(demo_paths.base), "--port", str(port), "--no-ui"),
                            *(f"--adapter={n}={p}" for n, p in demo_paths.adapters.items()),
                            *("--adapter-root", str(root), "--api-key", KEY),
                            *("--adapter-rescan-interval", "0", "--log-level", "warning"),
                        ],
                        env=_env(),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        for url, proc, log in zip(urls, procs, logs, strict=True):
            _wait_ready(url, proc, log)
        yield Replicas(urls, root.resolve())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def cli(*args: Any, env: dict[str, str | None] | None = None) -> Any:
    """The CLI in-process, as `tuneserve adapters ...`; no key from the environment."""
    env = {"TUNESERVE_ADMIN_KEY": None, "TUNESERVE_API_KEY": None, **(env or {})}
    result = CliRunner().invoke(app, ["adapters", *map(str, args)], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _url_args(replicas: Replicas) -> list[str]:
    return [arg for url in replicas.urls for arg in ("--url", url)]


def _chat(url: str, model: str, messages: list[dict[str, str]]) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=60, max_retries=0)
    try:
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=40
        )
    finally:
        client.close()
    return reply.choices[0].message.content or ""


def test_push_list_replace_remove_on_two_replicas(replicas: Replicas, demo_paths: Any) -> None:
    from tuneserve.models.demo import ADAPTER_EXAMPLES

    capitals_q, capitals_a = ADAPTER_EXAMPLES["capitals"][0]
    pirate_q, pirate_a = ADAPTER_EXAMPLES["pirate"][0]
    urls = _url_args(replicas)

    # one push: the folder lands in the shared root once, both servers load it
    result = cli("push", NAME, demo_paths.adapters["capitals"], *urls, "--api-key", KEY)
    assert result.exit_code == 0, result.output
    assert f"copied to {replicas.root / NAME}" in result.stdout
    for url in replicas.urls:
        assert f"{url}  loaded" in result.stdout
        assert _chat(url, NAME, capitals_q) == capitals_a
    assert (replicas.root / NAME / "adapter_config.json").is_file()
    assert not [p for p in replicas.root.iterdir() if p.name.startswith(".")]  # no staging left

    # list: the table, and the server's JSON
    result = cli("list", "--url", replicas.urls[1], "--api-key", KEY)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith(NAME))
    assert "api" in row and "q_proj" in row and "ago" in row  # it answered a chat just now
    assert f"root: {replicas.root}" in result.stdout
    listing = json.loads(cli("list", "--url", replicas.urls[0], "--api-key", KEY, "--json").stdout)
    assert listing["root"] == str(replicas.root)
    assert {a["name"] for a in listing["data"]} >= {NAME, "capitals", "pirate"}

    # push again under the same name: replaced in place on both
    result = cli("push", NAME, demo_paths.adapters["pirate"], *urls, "--api-key", KEY)
    assert result.exit_code == 0, result.output
    assert f"replaced {replicas.root / NAME}" in result.stdout
    for url in replicas.urls:
        assert f"{url}  replaced" in result.stdout
        assert _chat(url, NAME, pirate_q) == pirate_a

    # remove: the folder goes, and both answer 404 for the name (a rescan finds nothing)
    result = cli("remove", NAME, *urls, "--api-key", KEY)
    assert result.exit_code == 0, result.output
    assert f"deleted {replicas.root / NAME}" in result.stdout
    assert not (replicas.root / NAME).exists()
    for url in replicas.urls:
        assert f"{url}  removed" in result.stdout
        with pytest.raises(openai.NotFoundError):
            _chat(url, NAME, pirate_q)

    # removing it again: nothing anywhere is a clear error
    result = cli("remove", NAME, *urls, "--api-key", KEY)
    assert result.exit_code == 1
    assert f"no adapter {NAME!r}" in result.stderr


def test_missing_or_wrong_key_is_one_clear_line(replicas: Replicas, demo_paths: Any) -> None:
    url = replicas.urls[0]
    # as a user runs it: a process, the key neither given nor in the environment
    proc = subprocess.run(
        [sys.executable, "-m", "tuneserve", "adapters", "list", "--url", url],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "401" in proc.stderr and "no key was given" in proc.stderr
    assert "--api-key" in proc.stderr and "Traceback" not in proc.stderr

    # a wrong key (from the environment) on push: refused before anything is copied
    result = cli(
        "push",
        "wrong-key",
        demo_paths.adapters["capitals"],
        "--url",
        url,
        env={"TUNESERVE_ADMIN_KEY": "not-the-key"},
    )
    assert result.exit_code == 1
    assert "401" in result.stderr and "the key given was refused" in result.stderr
    assert not (replicas.root / "wrong-key").exists()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"config.json": "{}"}, "adapter_config.json and", id="no-adapter-files"),
        pytest.param(
            {"adapter_config.json": "{not json", "adapter_model.safetensors": ""},
            "not valid JSON",
            id="broken-config",
        ),
    ],
)
def test_push_of_a_folder_that_is_not_an_adapter(
    replicas: Replicas, tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    before = sorted(p.name for p in replicas.root.iterdir())
    result = cli("push", "nope", folder, *_url_args(replicas), "--api-key", KEY)
    assert result.exit_code == 1
    assert expected in result.stderr and str(folder) in result.stderr
    assert sorted(p.name for p in replicas.root.iterdir()) == before


def test_server_root_elsewhere_is_a_clear_error(replicas: Replicas, demo_paths: Any) -> None:
    """A server whose adapter root is not on this machine (here: moved away) gets no copy."""
    moved = replicas.root.with_name("models-moved")
    replicas.root.rename(moved)
    try:
        result = cli(
            "push",
            "elsewhere",
            demo_paths.adapters["capitals"],
            "--url",
            replicas.urls[0],
            "--api-key",
            KEY,
        )
    finally:
        moved.rename(replicas.root)
    assert result.exit_code == 1
    assert "not a folder on this machine" in result.stderr
    assert "--workspace" in result.stderr
    assert not (replicas.root / "elsewhere").exists()


def test_a_listing_of_another_shape_is_one_clear_line() -> None:
    """The CLI reads the server's answer through the protocol models: a server speaking another
    shape (an older tuneserve, here a card without most fields) is named, not a traceback."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"root": None, "data": [{"name": "a"}], "errors": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result = cli("list", "--url", url)
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1
    assert f"{url}/v1/adapters answered a listing this tuneserve cannot read" in result.stderr
    assert "data.0.path" in result.stderr
    assert "Traceback" not in result.stderr
