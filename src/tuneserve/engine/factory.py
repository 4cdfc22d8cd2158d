"""Pick an engine by name; the CLI and the tests build engines only through here."""

from __future__ import annotations

from typing import Literal

from tuneserve.engine.base import Engine
from tuneserve.models.types import ServedModel

EngineKind = Literal["continuous", "simple"]


def create_engine(
    kind: EngineKind,
    served: ServedModel,
    *,
    max_num_seqs: int = 32,
    max_loras: int = 8,
    max_cpu_loras: int | None = None,
    kv_cache_memory: int | None = None,
    gpu_memory_utilization: float | None = None,
    prefill_chunk: int | None = None,
) -> Engine:
    """`continuous`: continuous batching, own KV cache, batched multi-LoRA (the default).
    `simple`: static batches through PEFT, kept as a reference and a fallback (it has no KV
    budget of its own: the memory options apply to `continuous`)."""
    if kind == "continuous":
        from tuneserve.engine.continuous import ContinuousBatchingEngine

        return ContinuousBatchingEngine(
            served,
            max_num_seqs=max_num_seqs,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            prefill_chunk=prefill_chunk,
        )
    if kind == "simple":
        from tuneserve.engine.simple import PeftBatchEngine

        return PeftBatchEngine(served, max_batch_size=max_num_seqs)
    raise ValueError(f"unknown engine {kind!r}; choose 'continuous' or 'simple'")
