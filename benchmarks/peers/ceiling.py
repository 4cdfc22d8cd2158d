"""ceiling: the bare model's forward in a loop, no server, no LoRA, no sampling beyond argmax.

For each concurrency C, the N requests run in rounds of C rows: one prefill of the C prompts
(equal lengths, no padding) through HF's DynamicCache, then `max_tokens - 1` decode steps of
one token per row, argmax each time. TTFT is a round's prefill, inter-token latency a step.
One process for all C (the harness samples its RSS); prints one JSON line per C on stdout.

    python -m benchmarks.peers.ceiling --base DIR --concurrency 1,8,32 --requests 64 \\
        --prompt-len 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

PromptIds = Callable[[int, int], list[int]]  # (request index, length) -> token ids


def run_point(model: object, prompt: PromptIds, concurrency: int, requests: int,
              prompt_len: int, max_tokens: int) -> dict[str, object]:
    import torch

    ttft: list[float] = []
    itl: list[float] = []
    latency: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for first in range(0, requests, concurrency):
        rows = range(first, min(first + concurrency, requests))
        ids = torch.tensor([prompt(i, prompt_len) for i in rows])  # [B, T]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # type: ignore[operator]
            cache = out.cache
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            nxt.tolist()
            now = time.perf_counter()
            ttft += [now - t0] * len(rows)
            for _ in range(max_tokens - 1):
                out = model(input_ids=nxt, cache=cache, use_cache=True)  # type: ignore[operator]
                cache = out.cache
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                nxt.tolist()  # the per-step readout a server needs
                t = time.perf_counter()
                itl += [t - now] * len(rows)
                now = t
        latency += [time.perf_counter() - t0] * len(rows)
        tokens += max_tokens * len(rows)
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": requests,
        "completion_tokens": tokens,
        "wall_s": wall,
        "ttft_s": ttft,
        "itl_s": itl,
        "latency_s": latency,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def prompt_source(base: Path, size: str | None, vocab: int) -> PromptIds:
    """Prompts as token ids, made as the HTTP systems' are (real text for a real model)."""
    from benchmarks.model import prompt_ids, prompt_ids_for

    if size is None:
        return lambda i, length: prompt_ids(i, length, vocab)
    return lambda i, length: prompt_ids_for(size, base, i, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--concurrency", required=True, help="comma-separated batch sizes")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--size", help="the bench model's size: a real model gets real-text "
                        "prompts [random words over the model's vocabulary]")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    prompt = prompt_source(args.base, args.size, model.config.vocab_size)
    run_point(model, prompt, 1, 1, args.prompt_len, 4)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for c in (int(x) for x in args.concurrency.split(",")):
        result = run_point(model, prompt, c, args.requests, args.prompt_len, args.max_tokens)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
