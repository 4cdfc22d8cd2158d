"""Engine test fixtures: tiny models built once per session into a temp folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.tiny import TinyFamily, build_family, build_tokenizer
from tuneserve.engine.continuous import ContinuousBatchingEngine


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root: Path, tokenizer: Any) -> TinyFamily:
    return build_family("llama", tiny_root, tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root: Path, tokenizer: Any) -> TinyFamily:
    return build_family("qwen2", tiny_root, tokenizer)


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest) -> TinyFamily:
    family: TinyFamily = request.getfixturevalue(f"tiny_{request.param}")
    return family


@pytest.fixture
def engines() -> Iterator[list[ContinuousBatchingEngine]]:
    """Engines a test started; shut down after it."""
    started: list[ContinuousBatchingEngine] = []
    yield started
    for engine in started:
        engine.shutdown()
