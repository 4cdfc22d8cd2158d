"""The batched LoRA's two forms (engine/lora.py) on one forward of a constructed step.

No scheduler, no HTTP: a continuous engine on the real model (or --size) with 8 adapters in
its slots, its Linears packed as serving packs them, and steps built by hand, each timed as one
forward of the lean forward (`LeanForward`) in three settings of `lora.GROUPED_MIN_SPREAD`:
`dense` (never grouped), `grouped` (always) and `auto` (the engine's rule). Settings alternate
within each round, medians of rounds are reported (the machine drifts: only ratios count).

Steps:
  decode-turns    32 decodes at 144 keys, request i on adapter i % 8
  decode-random   32 decodes, each on an adapter drawn at random (seeded; as the harness picks)
  decode-one      32 decodes on one adapter (the K=1 reference)
  prefill-mix     four 128-token prompts on 4 adapters beside 28 decodes on all 8

    python -m benchmarks.lora_forms --cache benchmarks/out/models
    python -m benchmarks.lora_forms --steps decode-random --profile   # torch.profiler table
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_micro import served_model
from benchmarks.model import SIZES, ensure_bench_model

SETTINGS = {"dense": 10**9, "grouped": 1, "auto": None}


def build_step(
    engine: Any, slots: list[int], name: str
) -> tuple[Callable[[], torch.Tensor], list[int]]:
    """A forward of step `name` on `engine`, its rows on the given adapter slots; and the KV
    blocks its rows hold (to give back)."""
    from tuneserve.engine.attention import PackedStep, RowChunk

    cache, rng = engine.cache, random.Random(0)
    rows: list[RowChunk] = []
    token_slots: list[int] = []
    keep: list[int] = []
    held: list[int] = []

    def add(slot: int, start: int, tokens: int) -> None:
        blocks = cache.allocate(cache.blocks_for(start + tokens))
        assert blocks is not None, "the KV cache is too small for this step"
        held.extend(blocks)
        rows.append(RowChunk(blocks, start, tokens))
        token_slots.extend([slot] * tokens)
        keep.append(slot)

    decodes = {"decode-turns": 32, "decode-random": 32, "decode-one": 32, "prefill-mix": 28}[name]
    for i in range(decodes):
        slot = {
            "decode-turns": slots[i % 8],
            "decode-random": slots[rng.randrange(8)],
            "decode-one": slots[0],
            "prefill-mix": slots[i % 8],
        }[name]
        add(slot, 143, 1)
    if name == "prefill-mix":
        for i in range(4):
            add(slots[i], 0, 128)
    ids = torch.randint(0, engine._vocab_size, (len(token_slots),))
    last = torch.tensor([*range(decodes), *[decodes + 128 * (i + 1) - 1 for i in range(4)]])
    kept = last[: len(keep)]

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        step = PackedStep.build(cache, rows, engine.device)
        engine.loras.batch.set(token_slots, keep, engine.device)
        try:
            out: torch.Tensor = engine._lean(ids, step, kept)
            return out
        finally:
            engine.loras.batch.clear()

    return forward, held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/models"))
    parser.add_argument("--size", choices=list(SIZES), default="smollm2")
    parser.add_argument(
        "--steps",
        default="decode-turns,decode-random,decode-one,prefill-mix",
        help="comma-separated, from the steps above",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="forwards per setting a round")
    parser.add_argument("--profile", action="store_true", help="a torch.profiler table per step")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from tuneserve.engine import lora
    from tuneserve.engine.continuous import ContinuousBatchingEngine
    from tuneserve.engine.cpu_linear import can_pack, pack_linears

    bench = ensure_bench_model(args.cache, args.size, adapters=8)
    engine = ContinuousBatchingEngine(
        served_model(bench, 8), max_num_seqs=40, max_model_len=300, max_loras=8
    )
    if engine._lean is None:
        raise SystemExit(f"the {args.size} model has no lean forward: nothing to time here")
    if can_pack(engine.model):
        with torch.inference_mode():
            pack_linears(engine.model, kernels=engine.kernels)
    acquired = [engine.loras.acquire(name) for name in bench.adapter_names(8)]
    slots = [slot for slot in acquired if slot is not None]
    assert len(slots) == 8, "every adapter in a slot"
    default = lora.GROUPED_MIN_SPREAD
    results: list[dict[str, Any]] = []
    for name in args.steps.split(","):
        forward, held = build_step(engine, slots, name)
        times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for setting, spread in SETTINGS.items():
                lora.GROUPED_MIN_SPREAD = default if spread is None else spread
                engine.loras.batch.set((), (), engine.device)  # forget the last step's plans
                forward()  # a first call builds the step's cached masks and weights
                samples = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    forward()
                    samples.append(time.perf_counter() - start)
                times[setting].append(statistics.median(samples) * 1000)
        lora.GROUPED_MIN_SPREAD = default
        row = {"step": name, **{s: round(statistics.median(v), 2) for s, v in times.items()}}
        row["rounds_ms"] = {s: [round(t, 1) for t in v] for s, v in times.items()}
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(10):
                    forward()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        engine.cache.free(held)
    if args.out:
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
