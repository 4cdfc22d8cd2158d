"""The continuous-batching scheduler alone: decodes first, prompt chunks under the budget,
admission order, KV blocks taken as sequences grow, preemption of the newest when they run out,
waiting for LoRA slots, blocks and slots given back at finish."""

from __future__ import annotations

import pytest

from tuneserve.engine.scheduler import ScheduledChunk, Scheduler, Sequence
from tuneserve.engine.types import GenerationRequest, SamplingParams


class Blocks:
    """A block pool of `n` blocks of `size` tokens (the KVCache's bookkeeping, no tensors)."""

    def __init__(self, n: int, size: int = 4) -> None:
        self.free_blocks = list(range(1, n + 1))
        self.size = size

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.size)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free_blocks):
            return None
        taken, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return taken

    def free(self, blocks: list[int]) -> None:
        self.free_blocks = sorted(self.free_blocks + blocks)


class Adapters:
    """Hot slots by name, each pinned by a count; no eviction while pinned."""

    def __init__(self, n: int) -> None:
        self.names: list[str | None] = [None] * n
        self.refs = [0] * n

    def acquire(self, name: str) -> int | None:
        if name == "broken":
            raise OSError("weights file vanished")
        if name in self.names:
            slot = self.names.index(name)
        else:
            idle = [i for i in range(len(self.names)) if self.refs[i] == 0]
            if not idle:
                return None
            slot = idle[0]
            self.names[slot] = name
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1


def seq(name: str, prompt_len: int, adapter: str | None = None) -> Sequence:
    request = GenerationRequest(
        name, tuple(range(1, prompt_len + 1)), SamplingParams(max_tokens=4), adapter
    )
    return Sequence(request=request, token_ids=list(request.prompt_ids), max_tokens=4)


def advance(chunks: list[ScheduledChunk]) -> None:
    """What the engine does after a forward: count fed tokens, append a token where sampled."""
    for chunk in chunks:
        chunk.seq.num_computed += chunk.num_tokens
        if chunk.completes:
            chunk.seq.token_ids.append(0)


def plan(chunks: list[ScheduledChunk]) -> list[tuple[str, int]]:
    return [(c.seq.request.request_id, c.num_tokens) for c in chunks]


def test_decodes_always_run_and_prompts_share_the_chunk_budget() -> None:
    sched = Scheduler(Blocks(64), None, max_num_seqs=4, prefill_chunk=8)
    a, b, c = seq("a", 3), seq("b", 20), seq("c", 5)
    for s in (a, b, c):
        sched.add(s)
    step1 = sched.schedule()
    assert plan(step1) == [("a", 3), ("b", 5)]  # c waits: the budget is spent
    advance(step1)
    step2 = sched.schedule()
    assert plan(step2) == [("a", 1), ("b", 8)]  # a decodes; b's next chunk uses the budget
    advance(step2)
    step3 = sched.schedule()
    assert plan(step3) == [("a", 1), ("b", 7), ("c", 1)]
    assert [ch.completes for ch in step3] == [True, True, False]


def test_decode_rows_come_first_oldest_first_and_blocks_are_reused() -> None:
    blocks = Blocks(64)
    sched = Scheduler(blocks, None, max_num_seqs=4, prefill_chunk=100)
    seqs = [seq(f"s{i}", 2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    advance(sched.schedule())
    first_blocks = list(seqs[0].blocks)
    sched.finish(seqs[0])
    late = seq("late", 4)
    sched.add(late)
    chunks = sched.schedule()
    assert plan(chunks) == [("s1", 1), ("s2", 1), ("late", 4)]
    assert late.blocks == first_blocks  # the lowest free block is reused


def test_blocks_are_taken_as_a_sequence_grows() -> None:
    blocks = Blocks(64, size=4)
    sched = Scheduler(blocks, None, max_num_seqs=4, prefill_chunk=100)
    s = seq("s", 3)
    s.max_tokens = 8
    sched.add(s)
    counts = []
    for _ in range(6):
        advance(sched.schedule())
        counts.append(len(s.blocks))
    # 3 prompt tokens: 1 block; tokens 4..8 need a second block from the 5th token fed on
    assert counts == [1, 1, 2, 2, 2, 2]
    assert blocks.num_free == 64 - 2


def test_kv_blocks_and_seats_bound_the_running_set() -> None:
    blocks = Blocks(4, size=4)
    sched = Scheduler(blocks, None, max_num_seqs=8, prefill_chunk=100)
    seqs = [seq(f"s{i}", 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    advance(sched.schedule())
    # each admission leaves a free block per running sequence: s2 would leave too few
    assert [s.request.request_id for s in sched.running] == ["s0", "s1"]
    assert len(sched.waiting) == 2
    sched.finish(seqs[1])
    assert blocks.num_free == 3
    assert plan(sched.schedule()) == [("s0", 1), ("s2", 3)]

    seats = Scheduler(Blocks(64), None, max_num_seqs=1, prefill_chunk=100)
    for s in (seq("a", 2), seq("b", 2)):
        seats.add(s)
    assert plan(seats.schedule()) == [("a", 2)]


def test_when_blocks_run_out_the_newest_is_preempted_and_recomputed_later() -> None:
    blocks = Blocks(3, size=4)
    sched = Scheduler(blocks, None, max_num_seqs=4, prefill_chunk=100)
    old, new = seq("old", 4), seq("new", 3)
    old.max_tokens = new.max_tokens = 8
    sched.add(old)
    sched.add(new)
    step = sched.schedule()
    assert plan(step) == [("old", 4), ("new", 3)]
    advance(step)  # old: 5 tokens (needs a 2nd block next step), new: 4 tokens
    step = sched.schedule()  # old takes the last free block
    assert plan(step) == [("old", 1), ("new", 1)]
    advance(step)  # old 6 tokens / 2 blocks; new 5 tokens, its 5th needs a block: none free
    step = sched.schedule()
    assert plan(step) == [("old", 1)]
    assert not new.running and list(sched.waiting) == [new] and new.num_computed == 0
    assert new.blocks == [] and sched.num_preemptions == 1 and new.preemptions == 1
    assert new.token_ids[3:] == [0, 0]  # what it generated is kept, to be fed again
    advance(step)
    sched.finish(old)
    # readmitted: every token it has is fed as one prefill that completes (samples the next)
    step = sched.schedule()
    assert plan(step) == [("new", 5)] and step[0].completes
    advance(step)
    assert plan(sched.schedule()) == [("new", 1)]


def test_a_request_waiting_for_a_lora_slot_is_not_starved() -> None:
    adapters = Adapters(1)
    sched = Scheduler(Blocks(64), adapters, max_num_seqs=8, prefill_chunk=100)
    first, blocked, hot, base = seq("x1", 2, "x"), seq("y", 2, "y"), seq("x2", 2, "x"), seq("b", 2)
    for s in (first, blocked, hot, base):
        sched.add(s)
    chunks = sched.schedule()
    # y cannot get the one slot; x2 would pin it longer, so it waits too; the base request runs
    assert plan(chunks) == [("x1", 2), ("b", 2)]
    advance(chunks)
    sched.finish(first)  # x's slot drains
    assert plan(sched.schedule()) == [("b", 1), ("y", 2)]
    assert blocked.lora_slot == 0 and adapters.names == ["y"]


def test_finish_gives_back_kv_blocks_and_lora_slots() -> None:
    blocks, adapters = Blocks(2, size=4), Adapters(1)
    sched = Scheduler(blocks, adapters, max_num_seqs=1, prefill_chunk=10)
    s = seq("s", 3, "x")
    sched.add(s)
    sched.schedule()
    assert blocks.num_free == 1 and adapters.refs == [1]
    sched.finish(s)
    assert blocks.num_free == 2 and adapters.refs == [0] and not sched.has_work


def test_an_admission_error_fails_only_that_request() -> None:
    sched = Scheduler(Blocks(64), Adapters(2), max_num_seqs=4, prefill_chunk=10)
    bad, good = seq("bad", 2, "broken"), seq("good", 2, "x")
    sched.add(bad)
    sched.add(good)
    assert plan(sched.schedule()) == [("good", 2)]
    failures = sched.take_failures()
    assert [(s.request.request_id, str(e)) for s, e in failures] == [
        ("bad", "weights file vanished")
    ]
    assert not sched.waiting and sched.take_failures() == []


def test_prefill_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prefill_chunk must be at least 1"):
        Scheduler(Blocks(1), None, max_num_seqs=1, prefill_chunk=0)
