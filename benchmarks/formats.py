"""Serving formats against float32 on the real model: greedy agreement and decode speed.

Each prompt is answered alone (every decode step then has one token: with --decode-float16 it
reads the float16 copies), greedy, EOS ignored, by continuous engines on SmolLM2-135M-Instruct:
one float32, one per format (`decode-float16`: serve's --decode-float16; `bfloat16`: serve's
--dtype bfloat16, bfloat16 weights, float32 activations; a new format is an entry of FORMATS:
the engine's keyword arguments and the model's dtype). Reported per format: how many answers are
token-identical to float32's, where the others first part, and the decode tokens/s of each at
every --batch size (engines run one after the other, same prompts).

    python -m benchmarks.formats --cache benchmarks/out/models --prompts 16 --tokens 64
    python -m benchmarks.formats --formats decode-float16,bfloat16 --batch 1,8,32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_micro import engine_point, served_model
from benchmarks.model import ensure_bench_model

FORMATS: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "float32": (torch.float32, {}),
    "decode-float16": (torch.float32, {"decode_float16": True}),
    "bfloat16": (torch.bfloat16, {}),
}


def answers(
    engine: Any, bench: Any, prompts: int, tokens: int, adapter: str | None, batches: list[int]
) -> Any:
    """Each prompt's greedy tokens, and the median decode tok/s at each batch size."""
    import asyncio

    from tuneserve.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        request = GenerationRequest(f"p{i}", tuple(bench.prompt_ids(i, 128)), params, adapter)
        return [t async for delta in engine.submit(request) for t in delta.token_ids]

    outputs = [asyncio.run(one(i)) for i in range(prompts)]
    rates = {
        batch: statistics.median(
            engine_point(engine, bench, batch, 128, tokens, [adapter] if adapter else [])[
                "decode_tok_s"
            ]
            for _ in range(3)
        )
        for batch in batches
    }
    return outputs, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tuneserve-bench"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--adapter", action="store_true", help="answer with adapter a0")
    others = ", ".join(f for f in FORMATS if f != "float32")
    parser.add_argument("--formats", default="decode-float16",
                        help=f"comma-separated, of {others}")
    parser.add_argument("--batch", default="1", help="batch sizes for the speed, comma-separated")
    args = parser.parse_args()
    from tuneserve.engine.continuous import ContinuousBatchingEngine

    bench = ensure_bench_model(args.cache, "smollm2", 1)
    adapter = bench.adapter_names(1)[0] if args.adapter else None
    batches = [int(b) for b in args.batch.split(",")]
    results = {}
    for name in ["float32", *args.formats.split(",")]:
        dtype, options = FORMATS[name]
        engine = ContinuousBatchingEngine(served_model(bench, 1, dtype), max_num_seqs=max(batches),
                                          max_model_len=128 + args.tokens + 8, **options)
        engine.start()
        try:
            results[name] = answers(engine, bench, args.prompts, args.tokens, adapter, batches)
        finally:
            engine.shutdown()
        print(f"{name} done", file=sys.stderr, flush=True)
    full, full_rates = results.pop("float32")
    report: dict[str, Any] = {
        "prompts": args.prompts, "tokens": args.tokens, "adapter": adapter,
        "decode_tok_s": {"float32": {b: round(r, 1) for b, r in full_rates.items()}},
    }
    for name, (other, rates) in results.items():
        parted = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                  for x, y in zip(full, other, strict=True)]
        report[name] = {
            "identical": sum(p is None for p in parted),
            "first_parting_tokens": sorted(p for p in parted if p is not None),
            "tokens_identical_share": round(
                sum(args.tokens if p is None else p for p in parted)
                / (args.prompts * args.tokens), 3),
        }
        report["decode_tok_s"][name] = {b: round(r, 1) for b, r in rates.items()}
        report[name]["speedup"] = {b: round(rates[b] / full_rates[b], 2) for b in batches}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
