"""Container start rehearsal: the default `defaultCommands`, run as the container runs them
(`/bin/bash -c "<commands joined by '; '>"`), on a share laid out by deploy's own sync
(`base.sync_to_share`, the function `tuneserve deploy` calls), in a fresh virtual environment
that has torch and tuneserve's other dependencies but not tuneserve. So the third command,
`command -v tuneserve >/dev/null || pip install ... /mount/.tuneserve-build`, really installs the
synced build, and the server that answers `/ready` and the chat is that build.

As the local provider does (local.localize_commands), and nothing more, the commands are
localized: /mount -> the share folder, `--port 7860` -> a free loopback port, `--host 0.0.0.0` ->
127.0.0.1. What else differs from the container, and why:

- the fresh environment is `python -m venv --without-pip` plus a .pth naming a folder of links
  to this venv's site-packages minus everything tuneserve (the package, its dist-info, the
  editable hook), so torch & co import without copying gigabytes and pip finds no trace of
  tuneserve; `pip` in its bin is a launcher of that pip (the image brings its own);
- pip's own configuration is kept: every dependency is already there, and the one thing it
  fetches is the build backend (flit_core) into its isolated build environment, from the
  configured package index (PyPI in the container; the machine's package index here);
- the demo model instead of a GPU-sized one, HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set.

Slow (the install, two Python start-ups, the model load: about 30 s here), so marked `slow`;
it stays in the default run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import site
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tuneserve.deploy.base import sync_to_share
from tuneserve.deploy.build import BUILD_BACKEND, BUILD_REQUIRES, write_build
from tuneserve.deploy.http import get_json, is_ready
from tuneserve.deploy.infra import BUILD_DIR, DEFAULT_COMMANDS, InfraPaths
from tuneserve.deploy.local import localize_commands
from tuneserve.deploy.processes import tail_lines, terminate_group
from tuneserve.deploy.shares import LocalDirTarget

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 150.0  # the install plus the model load, on a busy 2-core machine
REVISION = "rehearsal--r1"


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def _fresh_venv(root: Path) -> tuple[Path, Path]:
    """(venv, its site-packages): torch and the rest importable, tuneserve nowhere."""
    deps = root / "deps"
    deps.mkdir()
    # this interpreter's site folders, its own first (a venv made with --system-site-packages
    # also lists the base's): the first of two same-named entries wins, as on sys.path
    for folder in site.getsitepackages():
        if not Path(folder).is_dir():
            continue
        for entry in Path(folder).iterdir():
            # .pth files are left out too: the editable install's hook is one (a folder named
            # in a .pth is put on sys.path, its own .pth files are not run anyway)
            if "tuneserve" in entry.name.lower() or entry.name.endswith(".pth"):
                continue
            if not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site_packages = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).strip()
    )
    (site_packages / "_rehearsal_deps.pth").write_text(f"{deps}\n")
    pip = venv / "bin" / "pip"  # what pip's own console script does
    pip.write_text(
        f"#!{python}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"
    )
    pip.chmod(0o755)
    return venv, site_packages


def _container_env(venv: Path, api_key: str) -> dict[str, str]:
    drop = ("TUNESERVE_", "PYTHON", "VIRTUAL_ENV", "CONDA")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    # no folder holding a `tuneserve` (an activated .venv): the image has none on PATH
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    path = [d for d in path if not (Path(d) / "tuneserve").exists()]
    env.update(
        PATH=os.pathsep.join([str(venv / "bin"), *path]),
        PYTHONNOUSERSITE="1",  # the user's ~/.local packages are not in the image
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        CONTAINER_APP_NAME="rehearsal",
        CONTAINER_APP_REVISION=REVISION,
        TUNESERVE_API_KEY=api_key,  # a Container Apps secret (secretRef) in the template
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def _probe(python: Path, env: dict[str, str]) -> dict[str, Any]:
    """What the fresh environment's Python sees of tuneserve (and that torch imports)."""
    code = (
        "import importlib.metadata as m, importlib.util, json, torch\n"
        "out = {'torch': torch.__version__, 'spec': None, 'url': None}\n"
        "spec = importlib.util.find_spec('tuneserve')\n"
        "if spec is not None:\n"
        "    out['spec'] = spec.origin\n"
        "try:\n"
        "    direct = m.distribution('tuneserve').read_text('direct_url.json') or 'null'\n"
        "    out['url'] = json.loads(direct)\n"
        "except m.PackageNotFoundError:\n"
        "    pass\n"
        "print(json.dumps(out))\n"
    )
    return dict(json.loads(_run([str(python), "-c", code], env=env, timeout=120)))


@pytest.mark.slow
def test_default_commands_install_the_synced_build_and_serve(
    tmp_path: Path, demo_cache: Path, cli: Callable[..., Any]
) -> None:
    openai = pytest.importorskip("openai")
    from tuneserve.models.demo import PIRATE_TALK

    # the share, laid out by deploy's sync: the workspace, its base model, the build
    ws, mount = tmp_path / "project", tmp_path / "mount"
    cli("init", ws, "--demo", "--toy", "--cache-dir", demo_cache)
    sync_to_share(InfraPaths(ws), LocalDirTarget(mount), include_model_cache=True)
    assert (mount / BUILD_DIR / "pyproject.toml").is_file()
    assert list(mount.glob("model-cache/*/*/config.json"))

    venv, site_packages = _fresh_venv(tmp_path)
    env = _container_env(venv, api_key=secrets.token_urlsafe(16))
    assert shutil.which("tuneserve", path=env["PATH"]) is None
    before = _probe(venv / "bin" / "python", env)
    assert before["spec"] is None and before["url"] is None, before  # no tuneserve at all
    assert before["torch"]  # but torch imports

    port = free_port()
    script = localize_commands(DEFAULT_COMMANDS, mount, port)
    assert "pip install" in script and f"--port {port}" in script
    share_before = LocalDirTarget(mount).list_files()
    log = tmp_path / "container.log"
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["/bin/bash", "-c", script],
            cwd="/",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped whole at the end
        )
    url = f"http://127.0.0.1:{port}"
    try:
        installed_at = None
        while not is_ready(url, timeout=2):
            if installed_at is None and (venv / "bin" / "tuneserve").exists():
                installed_at = time.monotonic() - start
            code = proc.poll()
            elapsed = time.monotonic() - start
            if code is not None or elapsed > READY_TIMEOUT_S:
                tail = "\n".join(tail_lines(log, 40))
                why = f"exited with {code}" if code is not None else "not ready in time"
                pytest.fail(f"the container {why} after {elapsed:.0f} s; its log:\n{tail}")
            time.sleep(0.5)
        ready_at = time.monotonic() - start

        # pip installed the synced build into the fresh environment, and that is what runs
        assert (venv / "bin" / "tuneserve").is_file()
        after = _probe(venv / "bin" / "python", env)
        assert Path(after["spec"]).is_relative_to(site_packages), after
        assert after["url"]["url"] == (mount / BUILD_DIR).as_uri(), after
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(venv / "bin" / "tuneserve").encode() in argv  # bash exec'd it
        synced = mount / BUILD_DIR / "src" / "tuneserve"
        for source in synced.rglob("*.py"):
            copy = site_packages / "tuneserve" / source.relative_to(synced)
            assert copy.read_bytes() == source.read_bytes(), copy
        assert get_json(url + "/health")["revision"] == REVISION  # the export ran

        client = openai.OpenAI(
            base_url=url + "/v1", api_key=env["TUNESERVE_API_KEY"], timeout=60, max_retries=0
        )
        try:
            reply = client.chat.completions.create(
                model="pirate",
                messages=[{"role": "user", "content": "Hello"}],
                temperature=0,
                max_tokens=40,
            )
        finally:
            client.close()
        assert reply.choices[0].message.content == PIRATE_TALK["Hello"]
    finally:
        terminate_group(proc.pid, grace=10)
        proc.wait(timeout=10)

    # the install wrote nothing to the share (replicas install from it at the same time)
    assert LocalDirTarget(mount).list_files() == share_before
    print(f"installed after {installed_at or 0:.1f} s, ready after {ready_at:.1f} s")


# --- the build itself (fast) -------------------------------------------------------------------


def test_the_build_asks_for_what_the_checkout_asks(tmp_path: Path) -> None:
    """The build's requirements are pyproject.toml's, not a stale editable install's metadata
    (the torch floor must reach the container)."""
    files = write_build(tmp_path / "build")
    assert "src/tuneserve/cli/__init__.py" in files
    assert "src/tuneserve/templates/inference.json" in files
    with (tmp_path / "build" / "pyproject.toml").open("rb") as fh:
        built = tomllib.load(fh)
    with (REPO / "pyproject.toml").open("rb") as fh:
        checkout = tomllib.load(fh)["project"]
    assert built["project"]["dependencies"] == checkout["dependencies"]
    assert built["project"]["version"] == checkout["version"]
    assert built["build-system"] == {"requires": BUILD_REQUIRES, "build-backend": BUILD_BACKEND}
