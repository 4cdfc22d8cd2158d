"""Continuous batching: which sequences run in the next forward, and how many tokens each.

Every step (the engine calls `schedule()` once per forward):

1. every running sequence that is decoding feeds its one new token (never stalled), taking a
   KV block when its next token starts one;
2. running sequences still in their prompt get the next chunk, oldest first, while the step's
   prefill budget (`prefill_chunk` prompt tokens) lasts;
3. waiting sequences are admitted in arrival order while a sequence seat (`max_num_seqs`),
   prefill budget and KV blocks for their first chunk remain (keeping one free block per running
   sequence, so admissions do not force preemptions), and their adapter can be put in a LoRA
   slot.

KV blocks (kv_cache.py) are taken as tokens need them. When a running sequence needs one and
none is free, the newest running sequence is preempted (vLLM's policy): its blocks and LoRA pin
go back, and it returns to the head of the queue with every token it has (prompt and generated)
to be fed again (recomputed) when it is readmitted. The oldest sequence always progresses, and
the engine's budget check guarantees one max-length sequence fits, so every request finishes.

A sequence whose adapter cannot get a LoRA slot (all pinned by running requests) waits. So that
it is not starved by a stream of requests for hot adapters, later adapter requests are not
admitted while it waits (base-model requests still are); it gets the first slot that drains.
A finished or cancelled sequence gives back its blocks and LoRA pin at once (`finish()`), so
the next step can reuse them.

Pure bookkeeping: no torch here.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuneserve.engine.types import GenerationRequest


class BlockPool(Protocol):
    @property
    def num_free(self) -> int: ...

    def blocks_for(self, num_tokens: int) -> int: ...

    def allocate(self, n: int) -> list[int] | None: ...

    def free(self, blocks: list[int]) -> None: ...


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
    blocks: list[int] = field(default_factory=list)  # its KV block table
    prefill_len: int = 0  # tokens to feed before decoding: the prompt, or all after preemption
    lora_slot: int = -1  # -1 = the bare base model
    finished: bool = False
    preemptions: int = 0
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
    def running(self) -> bool:
        """Admitted and holding KV blocks (every admission takes at least one)."""
        return bool(self.blocks)

    @property
    def is_decoding(self) -> bool:
        return self.num_computed >= max(self.prefill_len, self.prompt_len)


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
        kv_blocks: BlockPool,
        adapter_slots: AdapterSlots | None,
        *,
        max_num_seqs: int,
        prefill_chunk: int,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.kv_blocks = kv_blocks
        self.adapter_slots = adapter_slots
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self._failures: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """The next step's chunks: decode rows first (oldest first), then prefill chunks."""
        # 1. decodes, each with room for its token (preempting the newest when there is none)
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.running and seq.is_decoding and self._grow(seq, seq.num_computed + 1):
                decodes.append(seq)
        chunks = [ScheduledChunk(s, s.num_computed, s.num_pending) for s in decodes]
        budget = self.prefill_chunk
        # 2. prompts already admitted
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.running and not seq.is_decoding:
                n = min(seq.num_pending, budget)
                # it may preempt only when nothing else runs (never a row already scheduled)
                if self._grow(seq, seq.num_computed + n, preempt=not chunks):
                    chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                    budget -= n
        # 3. admissions
        blocked_on_adapter = False
        admitted: list[Sequence] = []
        for seq in self.waiting:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            n = min(seq.num_pending, budget)
            need = self.kv_blocks.blocks_for(n)
            if need + len(self.running) > self.kv_blocks.num_free:
                break  # keep a block of headroom per running sequence
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
            blocks = self.kv_blocks.allocate(need)
            assert blocks is not None
            seq.blocks = blocks
            seq.prefill_len = len(seq.token_ids)
            self.running.append(seq)
            admitted.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        for seq, _ in self._failures:
            self.waiting.remove(seq)
        return chunks

    def _grow(self, seq: Sequence, num_tokens: int, preempt: bool = True) -> bool:
        """Give `seq` blocks for `num_tokens` tokens, preempting the newest running sequences
        while none are free (if `preempt`). False when it got none (or was preempted itself)."""
        need = self.kv_blocks.blocks_for(num_tokens) - len(seq.blocks)
        while need > 0:
            blocks = self.kv_blocks.allocate(need)
            if blocks is not None:
                seq.blocks.extend(blocks)
                return True
            if not preempt:
                return False
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Stop `seq`, give back its blocks and LoRA pin; it waits first in line, to be fed
        again from its first token."""
        self._release(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def take_failures(self) -> list[tuple[Sequence, Exception]]:
        """Sequences `schedule()` dropped because admitting them raised (the engine fails them)."""
        failures, self._failures = self._failures, []
        return failures

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.kv_blocks.free(seq.blocks)
            seq.blocks = []
        if seq.lora_slot >= 0 and self.adapter_slots is not None:
            self.adapter_slots.release(seq.lora_slot)
            seq.lora_slot = -1

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out (finished, cancelled or failed) and give back its blocks and slots."""
        seq.finished = True
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
