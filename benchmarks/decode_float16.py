"""--decode-float16 against float32 on the real model: greedy agreement and one user's speed.

Each prompt is answered alone (every decode step then has one token, so it reads the float16
copies), greedy, EOS ignored, by two continuous engines on SmolLM2-135M-Instruct: one float32,
one with `decode_float16`. Reported: how many answers are token-identical, where the others
first part, and the decode tokens/s of each (engines run one after the other, same prompts).

    python -m benchmarks.decode_float16 --cache /tmp/tuneserve-bench --prompts 16 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.engine_micro import engine_point, served_model
from benchmarks.model import ensure_bench_model


def answers(engine: Any, bench: Any, prompts: int, tokens: int, adapter: str | None) -> Any:
    """Each prompt's greedy tokens, and the median decode tok/s over the prompts."""
    import asyncio

    from tuneserve.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        request = GenerationRequest(f"p{i}", tuple(bench.prompt_ids(i, 128)), params, adapter)
        return [t async for delta in engine.submit(request) for t in delta.token_ids]

    outputs = [asyncio.run(one(i)) for i in range(prompts)]
    rates = [engine_point(engine, bench, 1, 128, tokens, [adapter] if adapter else [])
             ["decode_tok_s"] for _ in range(3)]
    return outputs, statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tuneserve-bench"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--adapter", action="store_true", help="answer with adapter a0")
    args = parser.parse_args()
    from tuneserve.engine.continuous import ContinuousBatchingEngine

    bench = ensure_bench_model(args.cache, "smollm2", 1)
    adapter = bench.adapter_names(1)[0] if args.adapter else None
    results = {}
    for name, half in (("float32", False), ("decode-float16", True)):
        engine = ContinuousBatchingEngine(served_model(bench, 1), max_num_seqs=4,
                                          max_model_len=128 + args.tokens + 8,
                                          decode_float16=half)
        engine.start()
        try:
            results[name] = answers(engine, bench, args.prompts, args.tokens, adapter)
        finally:
            engine.shutdown()
        print(f"{name} done", file=sys.stderr, flush=True)
    (full, full_rate), (half, half_rate) = results["float32"], results["decode-float16"]
    parted = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
              for x, y in zip(full, half, strict=True)]
    print(json.dumps({
        "prompts": args.prompts, "tokens": args.tokens, "adapter": adapter,
        "identical": sum(p is None for p in parted),
        "first_parting_tokens": sorted(p for p in parted if p is not None),
        "tokens_identical_share": round(
            sum(args.tokens if p is None else p for p in parted) / (args.prompts * args.tokens), 3),
        "decode_tok_s": {"float32": round(full_rate, 1), "decode-float16": round(half_rate, 1)},
        "speedup": round(half_rate / full_rate, 2),
    }))


if __name__ == "__main__":
    main()
