"""What constrained decoding and logprobs cost, on a running server.

Start a server first (`tuneserve serve`, the real demo), then:

    python -m benchmarks.structured_output --url http://127.0.0.1:7860 --rounds 3

Each round runs three batches of 8 concurrent chat requests on the base model, in the order
A B C C B A (drift on a shared machine cancels):

  A free       8 free rows (ignore_eos, 64 new tokens each)
  B mixed      4 free rows beside 4 rows constrained to a JSON schema (up to 64 tokens)
  C logprobs   8 free rows that ask for logprobs with top_logprobs=5

and reports each kind of row's decode rate (completion tokens / its request's time) and the
batch's throughput. The free rows of B against those of A is what a constrained neighbour
costs; C against A is what logprobs cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["name", "country", "population_millions"],
    "additionalProperties": False,
}
FREE = [{"role": "user", "content": "Write a long story about the sea."}]
CONSTRAINED = [{"role": "user", "content": "Tell me about Paris as JSON."}]


def body(model: str, kind: str) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": 64}
    if kind == "constrained":
        request["messages"] = CONSTRAINED
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA},
        }
    else:
        request["messages"] = FREE
        request["ignore_eos"] = True
    if kind == "logprobs":
        request.update(logprobs=True, top_logprobs=5)
    return request


async def one(client: httpx.AsyncClient, model: str, kind: str) -> tuple[str, int, float]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body(model, kind))
    response.raise_for_status()
    tokens = int(response.json()["usage"]["completion_tokens"])
    return kind, tokens, time.perf_counter() - started


async def batch(client: httpx.AsyncClient, model: str, kinds: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    results = await asyncio.gather(*(one(client, model, k) for k in kinds))
    wall = time.perf_counter() - started
    rates: dict[str, list[float]] = {}
    for kind, tokens, seconds in results:
        rates.setdefault(kind, []).append(tokens / seconds)
    return {"throughput": sum(t for _, t, _ in results) / wall, "rates": rates}


BATCHES = {
    "A free": ["free"] * 8,
    "B mixed": ["free"] * 4 + ["constrained"] * 4,
    "C logprobs": ["logprobs"] * 8,
}


async def measure(url: str, rounds: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await batch(client, model, ["free", "constrained"])  # warm-up: first grammar, packing
        collected: dict[str, dict[str, list[float]]] = {name: {} for name in BATCHES}
        order = list(BATCHES) + list(reversed(BATCHES))
        for _ in range(rounds):
            for name in order:
                result = await batch(client, model, BATCHES[name])
                into = collected[name]
                into.setdefault("throughput", []).append(result["throughput"])
                for kind, values in result["rates"].items():
                    into.setdefault(kind, []).extend(values)
    return {
        name: {key: round(statistics.mean(values), 2) for key, values in parts.items()}
        for name, parts in collected.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    summary = asyncio.run(measure(args.url, args.rounds))
    print(json.dumps(summary, indent=2))
    print("\n| batch | throughput tok/s | free rows tok/s | constrained rows | logprobs rows |")
    print("|---|---:|---:|---:|---:|")
    for name, parts in summary.items():
        cells = [parts.get(k) for k in ("throughput", "free", "constrained", "logprobs")]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c}" for c in cells) + " |")


if __name__ == "__main__":
    main()
