"""The load generator: C streaming clients in a closed loop against one OpenAI-style endpoint.

Each client sends a request, reads its SSE stream to the end, and sends the next, until the
point's N requests are spent. Clients start together ("burst", BENCHMARK.md's closed loop: the
first C requests arrive at once) or "staggered": client k sends its first request once client
0's first one has streamed k/C of its tokens, the phases a closed loop of clients that came and
went would be in, so that a request meets a busy server rather than C prompts arriving with it
(what time to first token under load means; vLLM's benchmark spreads arrivals for the same
reason). Per request it records the time to the first text, the gaps
between text chunks, and the completion tokens (the usage chunk's count when the server sends
one, else the words seen: the bench tokenizer makes one word per token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    ttft_s: float = 0.0
    latency_s: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    itl_s: list[float] = field(default_factory=list)  # per token after the first chunk

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        if self.completion_tokens < 2:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class PointRun:
    wall_s: float
    results: list[RequestResult]
    client_cpu_s: float = 0.0  # CPU the load generator itself used (what it takes from servers)


def chunk_text(event: dict[str, Any]) -> str:
    """The text a completions or chat-completions chunk carries ('' for none)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def words(text: str) -> int:
    """Tokens in a streamed chunk's text, as near as text tells: one a word (the bench
    tokenizer's words are its tokens); a real tokenizer's whitespace-only token ("\\n") is
    one too, so its timing is not lost."""
    return len(text.split()) or (1 if text else 0)


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streaming /v1/completions request: greedy, EOS ignored, usage in the last chunk."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an OpenAI-style SSE stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                      on_tokens: Callable[[int], None] | None = None) -> RequestResult:
    """One streamed request; `on_tokens(seen)` after each text chunk, with the tokens so far."""
    result = RequestResult()
    seen_words = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for event in sse_events(response):
                if "error" in event:
                    result.error = f"stream error: {str(event['error'])[:300]}"
                    return result
                usage = event.get("usage")
                if usage:
                    result.completion_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                n = words(chunk_text(event))
                if n == 0:
                    continue
                now = time.perf_counter()
                if seen_words == 0:
                    result.ttft_s = now - start
                else:  # a chunk of n tokens: its gap is shared evenly among them
                    result.itl_s += [(now - last) / n] * n
                seen_words += n
                last = now
                if on_tokens is not None:
                    on_tokens(seen_words)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    result.latency_s = time.perf_counter() - start
    if result.completion_tokens == 0:
        result.completion_tokens = seen_words
    result.ok = seen_words > 0
    if not result.ok:
        result.error = "the stream carried no text"
    return result


async def closed_loop(url: str, body_for: Callable[[int], dict[str, Any]], requests: int,
                      concurrency: int, timeout_s: float = 600.0,
                      stagger_tokens: int | None = None) -> PointRun:
    """Run `requests` requests through `concurrency` clients; request i gets body_for(i).
    `stagger_tokens` (the tokens a request streams): the clients start staggered, not at once."""
    indices = iter(range(requests))
    results: list[RequestResult] = [RequestResult() for _ in range(requests)]
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    # staggered: client k waits for started[k], set once the first request has streamed
    # k/C of its tokens (or ended)
    started = [asyncio.Event() for _ in range(concurrency)]
    staggered = stagger_tokens is not None

    def pace(seen: int) -> None:
        assert stagger_tokens is not None
        for k in range(1, min(concurrency, seen * concurrency // stagger_tokens + 1)):
            started[k].set()

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker(k: int) -> None:
            if staggered and k:
                await started[k].wait()
            for i in indices:  # shared iterator: each index is taken once
                paced = staggered and i == 0
                results[i] = await one_request(client, url, body_for(i), pace if paced else None)
                if paced:
                    for event in started:
                        event.set()

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return PointRun(wall, results, cpu)


def run_closed_loop(url: str, body_for: Callable[[int], dict[str, Any]], requests: int,
                    concurrency: int, timeout_s: float = 600.0,
                    stagger_tokens: int | None = None) -> PointRun:
    return asyncio.run(
        closed_loop(url, body_for, requests, concurrency, timeout_s, stagger_tokens))
