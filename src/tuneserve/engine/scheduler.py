"""Continuous batching: which sequences run in the next forward, and how many tokens each.

Every step (the engine calls `schedule()` once per forward):

1. every running sequence that is decoding feeds its one new token (never stalled);
2. running sequences still in their prompt get the next chunk, oldest first, while the step's
   prefill budget (`prefill_chunk` prompt tokens) lasts;
3. waiting sequences are admitted in arrival order while a KV slot, a sequence seat
   (`max_num_seqs`) and prefill budget remain, and their adapter can be put in a LoRA slot.

A sequence whose adapter cannot get a LoRA slot (all pinned by running requests) waits. So that
it is not starved by a stream of requests for hot adapters, later adapter requests are not
admitted while it waits (base-model requests still are); it gets the first slot that drains.
A finished or cancelled sequence gives back its KV slot and LoRA pin at once (`finish()`), so
the next step can reuse them.

Pure bookkeeping: no torch here.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuneserve.engine.types import GenerationRequest


class SlotPool(Protocol):
    @property
    def num_free(self) -> int: ...

    def allocate(self) -> int | None: ...

    def free(self, slot: int) -> None: ...


class AdapterSlots(Protocol):
    def acquire(self, name: str) -> int | None: ...

    def release(self, slot: int) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One request inside the engine, from submission to its end."""

    request: GenerationRequest
    token_ids: list[int]  # prompt, then generated tokens
    max_tokens: int  # the most tokens to generate (params.max_tokens, clipped to the context)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    kv_slot: int | None = None
    lora_slot: int = -1  # -1 = the bare base model
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # the engine's per-request state

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Tokens not yet fed through the model (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_computed >= self.prompt_len


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token fed
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk the sequence has fed every token: its last logits are sampled."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(
        self,
        kv_slots: SlotPool,
        adapter_slots: AdapterSlots | None,
        *,
        max_num_seqs: int,
        prefill_chunk: int,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.kv_slots = kv_slots
        self.adapter_slots = adapter_slots
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._failures: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """The next step's chunks: decode rows first (by KV slot), then prefill chunks."""
        # 1. decodes
        decodes = sorted((s for s in self.running if s.is_decoding), key=lambda s: s.kv_slot or 0)
        chunks = [ScheduledChunk(s, s.num_computed, s.num_pending) for s in decodes]
        budget = self.prefill_chunk
        # 2. prompts already admitted
        for seq in self.running:
            if budget == 0:
                break
            if not seq.is_decoding:
                n = min(seq.num_pending, budget)
                chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                budget -= n
        # 3. admissions
        blocked_on_adapter = False
        admitted: list[Sequence] = []
        for seq in self.waiting:
            if budget == 0 or len(self.running) >= self.max_num_seqs or self.kv_slots.num_free == 0:
                break
            adapter = seq.request.adapter
            if adapter is not None:
                if blocked_on_adapter or self.adapter_slots is None:
                    continue
                try:
                    slot = self.adapter_slots.acquire(adapter)
                except Exception as exc:  # e.g. its weights file is gone: fail it alone
                    self._failures.append((seq, exc))
                    continue
                if slot is None:
                    blocked_on_adapter = True
                    continue
                seq.lora_slot = slot
            kv_slot = self.kv_slots.allocate()
            assert kv_slot is not None
            seq.kv_slot = kv_slot
            self.running.append(seq)
            admitted.append(seq)
            n = min(seq.num_pending, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        for seq, _ in self._failures:
            self.waiting.remove(seq)
        return chunks

    def take_failures(self) -> list[tuple[Sequence, Exception]]:
        """Sequences `schedule()` dropped because admitting them raised (the engine fails them)."""
        failures, self._failures = self._failures, []
        return failures

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out (finished, cancelled or failed) and give back its slots."""
        seq.finished = True
        if seq.kv_slot is not None:
            self.kv_slots.free(seq.kv_slot)
            seq.kv_slot = None
        if seq.lora_slot >= 0 and self.adapter_slots is not None:
            self.adapter_slots.release(seq.lora_slot)
            seq.lora_slot = -1
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
