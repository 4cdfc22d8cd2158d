"""Engines by name: the one list that `--engine`, TUNESERVE_ENGINE and the tests choose from.

A backend is an Engine subclass (engine/base.py) plus an entry in ENGINES whose `build` makes it
from what is served (models/types.py ServedModel: names, tokenizer, where the weights are, the
adapters read at start). The torch engines load the transformers weights themselves
(models/loader.py `load_weights`); a backend that runs its model elsewhere loads it its own way.
Imports stay inside each `build`, so listing the names (settings, --help) imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tuneserve.engine.base import Engine
from tuneserve.models.types import LoadedModel, ServedModel

DEFAULT_ENGINE = "continuous"


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """The serve options an engine may use; None: that engine's default."""

    max_num_seqs: int = 32
    max_loras: int = 8
    max_cpu_loras: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float | None = None
    prefill_chunk: int | None = None
    decode_float16: bool | None = None


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    summary: str  # one line for --help
    build: Callable[[ServedModel, EngineOptions], Engine]
    # EngineOptions fields it has no use for: the CLI refuses them rather than ignore them
    ignores: frozenset[str] = frozenset()
    ignores_why: str = ""


def _torch_model(served: ServedModel) -> LoadedModel:
    from tuneserve.models.loader import load_weights

    return served if isinstance(served, LoadedModel) else load_weights(served)


def _continuous(served: ServedModel, options: EngineOptions) -> Engine:
    from tuneserve.engine.continuous import ContinuousBatchingEngine

    # its keyword arguments are EngineOptions' fields, one for one
    return ContinuousBatchingEngine(_torch_model(served), **asdict(options))


def _simple(served: ServedModel, options: EngineOptions) -> Engine:
    from tuneserve.engine.simple import PeftBatchEngine

    return PeftBatchEngine(_torch_model(served), max_batch_size=options.max_num_seqs)


ENGINES: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend(
            "continuous",
            "continuous batching, own KV cache, batched multi-LoRA (fast)",
            _continuous,
        ),
        Backend(
            "simple",
            "static batches through PEFT (a reference and a fallback)",
            _simple,
            ignores=frozenset(
                {"kv_cache_memory", "gpu_memory_utilization", "prefill_chunk", "decode_float16"}
            ),
            ignores_why="has no KV cache budget, prefill chunks or packed CPU Linears",
        ),
    )
}


def engine_names() -> list[str]:
    return list(ENGINES)


def engines_help() -> str:
    """`name: summary | ...`, for --help and the settings' description."""
    return " | ".join(f"{b.name}: {b.summary}" for b in ENGINES.values())


def backend(name: str) -> Backend:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}") from None


def create_engine(name: str, served: ServedModel, **options: Any) -> Engine:
    """Build the engine `name` for `served`; `options` are EngineOptions fields (a TypeError
    names one that is not).

    Given a LoadedModel, the torch engines run its model (never share one between engines: they
    wrap it); given a plain ServedModel they load the weights first.
    """
    return backend(name).build(served, EngineOptions(**options))
