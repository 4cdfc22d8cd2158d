"""Engine micro-benchmark: decode tokens/s of ContinuousBatchingEngine vs HF's DynamicCache loop.

No HTTP: requests go straight to `engine.submit()` on one event loop. For each batch size C,
C requests (BENCHMARK.md's prompts: 128 random words, or real text on a real model; 128 new
tokens, ignore_eos, greedy) are submitted together; "decode tok/s" counts the tokens that
arrive while every request is past its first token and none has finished (the steady decode
phase), over that window's duration.
The HF peer is the "ceiling" loop: one prefill of the C prompts, then one-token decode steps
through a DynamicCache with argmax, timed over the decode steps only.

Variants per C:
  hf            bare model, DynamicCache loop (the ceiling peer)
  engine        ContinuousBatchingEngine, no adapters served
  engine-idle   8 adapters served (slots loaded), every request on the base model
  engine-lora   8 adapters served, request i uses adapter i % 8
  engine-hf-forward, engine-lora-hf-forward
                the same as engine / engine-lora through HF's modeling code instead of the
                lean forward (engine/lean_forward.py): what the lean forward gains
  engine-torch  the same as engine with torch's kernels only (no engine/csrc kernels): what
                our CPU kernels gain
  engine-modules, engine-lora-modules
                the same as engine / engine-lora with every step through the lean forward's
                modules (no engine/direct_decode.py): what direct kernel calls gain

    python -m benchmarks.engine_micro --cache /tmp/tuneserve-bench --batch 1,8,32

Numbers from a shared machine are noisy: compare ratios taken in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.model import SIZES, BenchModel, ensure_bench_model


def hf_decode_tok_s(
    model: Any, bench: BenchModel, batch: int, prompt_len: int, new_tokens: int
) -> float:
    ids = torch.tensor([bench.prompt_ids(i, prompt_len) for i in range(batch)])  # [B, T]
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        nxt.tolist()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()
        return batch * (new_tokens - 1) / (time.perf_counter() - start)


def served_model(bench: BenchModel, adapters: int, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneserve.models.types import AdapterSpec, LoadedModel

    specs = {}
    for name in bench.adapter_names(adapters):
        config = json.loads((bench.adapters[name] / "adapter_config.json").read_text())
        specs[name] = AdapterSpec(
            name=name,
            path=bench.adapters[name],
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=tuple(config["target_modules"]),
            config=config,
        )
    model = AutoModelForCausalLM.from_pretrained(bench.base, dtype=dtype).eval()
    return LoadedModel(
        base_name="bench",
        base_path=str(bench.base),
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(bench.base),
        adapters=specs,
        max_model_len=1024,
        eos_token_ids=(2,),
    )


async def _engine_point(
    engine: Any, bench: BenchModel, batch: int, prompt_len: int, new_tokens: int,
    adapters: list[str],
) -> dict[str, float]:
    from tuneserve.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [tuple(bench.prompt_ids(i, prompt_len)) for i in range(batch)]  # before the clock
    arrivals: list[list[float]] = [[] for _ in range(batch)]

    async def one(i: int) -> None:
        adapter = adapters[i % len(adapters)] if adapters else None
        request = GenerationRequest(f"b{batch}-{i}", prompts[i], params, adapter)
        async for delta in engine.submit(request):
            arrivals[i].extend([time.perf_counter()] * len(delta.token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    wall = time.perf_counter() - start
    begin = max(times[0] for times in arrivals)  # every request past its first token
    end = min(times[-1] for times in arrivals)  # before the first one finished
    window = [t for times in arrivals for t in times if begin < t <= end]
    ttft = [times[0] - start for times in arrivals]
    return {
        "decode_tok_s": len(window) / (end - begin) if end > begin else float("nan"),
        "total_tok_s": batch * new_tokens / wall,
        "ttft_p50_s": statistics.median(ttft),
    }


def engine_point(
    engine: Any, bench: BenchModel, batch: int, prompt_len: int, new_tokens: int,
    adapters: list[str],
) -> dict[str, float]:
    return asyncio.run(_engine_point(engine, bench, batch, prompt_len, new_tokens, adapters))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tuneserve-bench"))
    parser.add_argument("--size", choices=list(SIZES), default="bench")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--variants", default="hf,engine,engine-idle,engine-lora")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats; median kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--decode-float16", action="store_true",
                        help="engines as serve's --decode-float16")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the served model's, as serve's --dtype")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tuneserve.engine.continuous import ContinuousBatchingEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    batches = [int(b) for b in args.batch.split(",")]
    variants = args.variants.split(",")
    bench = ensure_bench_model(args.cache, args.size, adapters=args.adapters)
    names = bench.adapter_names(args.adapters)

    # every system built up front; variants interleaved within each round (drift hits all alike)
    hf_model = None
    if "hf" in variants:
        hf_model = AutoModelForCausalLM.from_pretrained(bench.base, dtype=torch.float32).eval()
        hf_decode_tok_s(hf_model, bench, 1, args.prompt_len, 4)  # warm-up
    setups = {  # adapters served, adapters used, the lean forward, our CPU kernels, direct
        "engine": (0, [], True, True, True),
        "engine-idle": (args.adapters, [], True, True, True),
        "engine-lora": (args.adapters, names, True, True, True),
        "engine-hf-forward": (0, [], False, True, True),
        "engine-lora-hf-forward": (args.adapters, names, False, True, True),
        "engine-torch": (0, [], True, False, True),
        "engine-modules": (0, [], True, True, False),
        "engine-lora-modules": (args.adapters, names, True, True, False),
    }
    engines: dict[str, tuple[Any, list[str]]] = {}
    for variant, (served_adapters, used, lean, kernels, direct) in setups.items():
        if variant not in variants:
            continue
        engine = ContinuousBatchingEngine(
            served_model(bench, served_adapters, getattr(torch, args.dtype)),
            max_num_seqs=max(batches),
            max_model_len=args.prompt_len + args.new_tokens + 8,
            max_loras=max(served_adapters, 1),
            decode_float16=args.decode_float16,
            lean_forward=lean,
            cpu_kernels=kernels,
            direct_decode=direct,
        )
        if engine.loras is not None:  # every adapter in its slot before timing
            for name in names[:served_adapters]:
                engine.loras.release(engine.loras.acquire(name))  # type: ignore[arg-type]
        engine.start()
        engine_point(engine, bench, 2, args.prompt_len, 4, used)  # warm-up
        engines[variant] = (engine, used)

    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for round_ in range(args.rounds):
            for b in batches:
                if hf_model is not None:
                    rate = hf_decode_tok_s(hf_model, bench, b, args.prompt_len, args.new_tokens)
                    samples.setdefault(("hf", b), []).append({"decode_tok_s": rate})
                for variant, (engine, used) in engines.items():
                    point = engine_point(engine, bench, b, args.prompt_len, args.new_tokens, used)
                    samples.setdefault((variant, b), []).append(point)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for engine, _ in engines.values():
            engine.shutdown()

    results = []
    for (variant, b), points in samples.items():
        row: dict[str, Any] = {"variant": variant, "batch": b}
        for key in points[0]:
            row[key] = statistics.median(p[key] for p in points)
        row["decode_tok_s_all"] = [round(p["decode_tok_s"], 1) for p in points]
        results.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "decode_float16": args.decode_float16,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
