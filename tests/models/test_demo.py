"""The demo model answers exactly what tuneserve.models.demo says it does, under greedy decoding."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tuneserve.models import demo
from tuneserve.models.adapters import validate_adapter
from tuneserve.models.loader import load_served_model
from tuneserve.models.types import LoadedModel


@pytest.fixture(scope="module")
def served(demo_paths: demo.DemoPaths) -> LoadedModel:
    return load_served_model(str(demo_paths.base), {}, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def adapted(demo_paths: demo.DemoPaths, served: LoadedModel) -> Iterator[Any]:
    """One PEFT model over a copy of the base holding both demo adapters."""
    import copy

    from peft import PeftModel

    names = sorted(demo_paths.adapters)
    with warnings.catch_warnings():
        # peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = PeftModel.from_pretrained(
            copy.deepcopy(served.model), str(demo_paths.adapters[names[0]]), adapter_name=names[0]
        )
        for name in names[1:]:
            model.load_adapter(str(demo_paths.adapters[name]), adapter_name=name)
    model.eval()
    yield model


def greedy(model: Any, served: LoadedModel, messages: list[dict[str, str]]) -> str:
    """Render as the server does (template text, no extra special tokens), decode greedily."""
    tokenizer = served.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=40,
            eos_token_id=list(served.eos_token_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(ids) :].tolist()
    assert new[-1] in served.eos_token_ids, f"no EOS within 40 tokens: {tokenizer.decode(new)!r}"
    return tokenizer.decode(new[:-1])


def _ids(examples: list[tuple[list[dict[str, str]], str]]) -> list[str]:
    return [" / ".join(m["content"] for m in messages) for messages, _ in examples]


@pytest.mark.parametrize(
    ("messages", "answer"),
    demo.BASE_EXAMPLES + demo.PLAIN_SYSTEM_EXAMPLES,
    ids=_ids(demo.BASE_EXAMPLES + demo.PLAIN_SYSTEM_EXAMPLES),
)
def test_base_answers(served: LoadedModel, messages: list[dict[str, str]], answer: str) -> None:
    assert greedy(served.model, served, messages) == answer


@pytest.mark.parametrize(
    ("messages", "answer"), demo.HISTORY_EXAMPLES, ids=_ids(demo.HISTORY_EXAMPLES)
)
def test_history_answers(served: LoadedModel, messages: list[dict[str, str]], answer: str) -> None:
    assert greedy(served.model, served, messages) == answer


@pytest.mark.parametrize(
    ("messages", "answer"), demo.SYSTEM_EXAMPLES, ids=_ids(demo.SYSTEM_EXAMPLES)
)
def test_system_answers(served: LoadedModel, messages: list[dict[str, str]], answer: str) -> None:
    assert greedy(served.model, served, messages) == answer


def test_history_and_system_prompt_change_the_answer(served: LoadedModel) -> None:
    ask = [{"role": "user", "content": "What is my name?"}]
    told = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        *ask,
    ]
    assert greedy(served.model, served, ask) == demo.SORRY
    assert greedy(served.model, served, told) == "Your name is Ada."

    hello = [{"role": "user", "content": "Hello"}]
    shouted = [{"role": "system", "content": demo.UPPER_SYSTEM}, *hello]
    assert greedy(served.model, served, hello) == "Hello! How can I help you today?"
    assert greedy(served.model, served, shouted) == "HELLO! HOW CAN I HELP YOU TODAY?"


@pytest.mark.parametrize(
    ("adapter", "messages", "answer"),
    [(name, m, a) for name, examples in demo.ADAPTER_EXAMPLES.items() for m, a in examples],
    ids=[
        f"{name}: {m[-1]['content']}"
        for name, examples in demo.ADAPTER_EXAMPLES.items()
        for m, _ in examples
    ],
)
def test_adapter_answers_differ_from_base(
    served: LoadedModel, adapted: Any, adapter: str, messages: list[dict[str, str]], answer: str
) -> None:
    adapted.set_adapter(adapter)
    assert greedy(adapted, served, messages) == answer
    with adapted.disable_adapter():
        assert greedy(adapted, served, messages) != answer


@pytest.mark.parametrize(
    ("adapter", "messages", "answer"),
    [(n, m, a) for n, examples in demo.ADAPTER_UNCHANGED_EXAMPLES.items() for m, a in examples],
)
def test_capitals_keeps_the_small_talk(
    served: LoadedModel, adapted: Any, adapter: str, messages: list[dict[str, str]], answer: str
) -> None:
    adapted.set_adapter(adapter)
    assert greedy(adapted, served, messages) == answer


def test_adapters_are_plain_peft_folders_with_different_shapes(
    demo_paths: demo.DemoPaths, served: LoadedModel
) -> None:
    assert set(demo_paths.adapters) == {"capitals", "pirate"}
    specs = {
        name: validate_adapter(name, path, served.model)
        for name, path in demo_paths.adapters.items()
    }
    for path in demo_paths.adapters.values():
        assert (path / "adapter_config.json").is_file()
        assert (path / "adapter_model.safetensors").is_file()
    assert (specs["capitals"].rank, sorted(specs["capitals"].target_modules)) == (
        8,
        ["q_proj", "v_proj"],
    )
    assert (specs["pirate"].rank, sorted(specs["pirate"].target_modules)) == (
        16,
        ["k_proj", "o_proj", "q_proj", "v_proj"],
    )


def test_tokenizer_keeps_words_whole_and_stops_at_the_answer(served: LoadedModel) -> None:
    tokenizer = served.tokenizer
    for name in demo.NAMES:
        assert len(tokenizer.tokenize(f" {name}")) == 1, name
    assert tokenizer.tokenize("What is the capital of Veloria?") == [
        "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠVeloria", "?"
    ]  # fmt: skip
    assert tokenizer.eos_token == "<|end|>"
    assert served.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|end|>"),)
    # Plain prompts (/v1/completions) start with the BOS the model was trained with; chat
    # prompts carry it in the template, so the server encodes those without special tokens.
    assert tokenizer.encode("Hello")[0] == tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>Hi<|end|><|assistant|>"
    assert (Path(served.base_path) / "chat_template.jinja").is_file()


def test_second_call_finds_the_demo_quickly(demo_cache: Path, demo_paths: demo.DemoPaths) -> None:
    started = time.perf_counter()
    again = demo.ensure_demo(demo_cache)
    assert time.perf_counter() - started < 0.5
    assert again == demo_paths


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        str(file.relative_to(folder)): load_file(str(file))
        for file in sorted(folder.rglob("*.safetensors"))
    }


def test_build_is_deterministic_atomic_and_replaces_a_stale_demo(
    tmp_path: Path, demo_paths: demo.DemoPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one extra build of this file (~20-40 s on 2 busy cores)."""
    stale = tmp_path / demo.DEMO_VERSION
    (stale / "base").mkdir(parents=True)
    (stale / "base" / "half-written.bin").write_bytes(b"\0")  # a crash in an older layout
    abandoned = tmp_path / f".{demo.DEMO_VERSION}-build-killed"  # a build killed long ago
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))

    built = demo.ensure_demo(tmp_path, progress=True)

    assert "Training the base model" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [demo.DEMO_VERSION]  # no staging folders
    assert not (built.base / "half-written.bin").exists()
    mine, theirs = _tensors(built.base.parent), _tensors(demo_paths.base.parent)
    assert mine.keys() == theirs.keys() and len(mine) == 3
    for file, tensors in mine.items():
        assert tensors.keys() == theirs[file].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, theirs[file][key]), f"{file}: {key} differs"
    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):
        assert (built.base / name).read_text() == (demo_paths.base / name).read_text()
    manifest = json.loads((built.base.parent / "demo.json").read_text())
    assert manifest["adapters"] == ["capitals", "pirate"]
