"""peft-batch: PEFT mixed-adapter static batching behind a small HTTP server.

Requests wait in a queue; a worker thread takes everything waiting (up to --max-batch-size),
left-pads it into one batch and runs `model.generate(..., adapter_names=[...])` on it to the end
(the longest request's max_tokens); requests that arrive meanwhile wait for the next batch.
Tokens stream back per row as they are made. This is what PEFT offers out of the box for
serving several adapters at once.

    python -m benchmarks.peers.peft_batch --base DIR --adapter a0=DIR ... --port P \\
        --max-batch-size N

Speaks streaming `/v1/completions` only (what the harness sends). Text is detokenized one
token at a time: the bench model's word-level tokens get a space between them, a byte-level
BPE's (the real model's) carry their own (a character split across tokens would come out
garbled; the harness only counts the chunks).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks.peers._http import (
    CompletionBody,
    adapter_pairs,
    add_common_routes,
    load_peft,
    parse_args,
    prompt_ids,
    stream_events,
)

log = logging.getLogger(__name__)
BASE = "__base__"  # PEFT's adapter_names entry for "no adapter"


@dataclass
class Pending:
    ids: list[int]
    adapter: str
    max_tokens: int
    min_new: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[int | None]
    count: list[int] = field(default_factory=lambda: [0])
    done: bool = False

    def emit(self, token: int | None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, token)


class RowStreamer:
    """A generate() streamer that routes each row's new token to its own request."""

    def __init__(self, rows: list[Pending], eos: set[int]) -> None:
        self.rows = rows
        self.eos = eos
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if row.done:
                continue
            if token in self.eos and not row.ignore_eos and row.count[0] >= row.min_new:
                self._finish(row)
                continue
            row.count[0] += 1
            row.emit(token)
            if row.count[0] >= row.max_tokens:
                self._finish(row)

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                self._finish(row)

    @staticmethod
    def _finish(row: Pending) -> None:
        row.done = True
        row.emit(None)


class Batcher(threading.Thread):
    def __init__(self, model: Any, tokenizer: Any, max_batch: int) -> None:
        super().__init__(daemon=True, name="peft-batch")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.waiting: queue.Queue[Pending] = queue.Queue()
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def submit(self, pending: Pending) -> None:
        self.waiting.put(pending)

    def run(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            self._generate(batch)

    def _generate(self, batch: list[Pending]) -> None:
        import torch

        width = max(len(p.ids) for p in batch)
        input_ids = torch.tensor([[self.pad] * (width - len(p.ids)) + p.ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch])
        streamer = RowStreamer(batch, self.eos)
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    adapter_names=[p.adapter for p in batch],
                    max_new_tokens=max(p.max_tokens for p in batch),
                    min_new_tokens=max(p.min_new for p in batch),
                    do_sample=False,
                    pad_token_id=self.pad,
                    streamer=streamer,
                )
        except Exception:
            log.exception("generate failed for a batch of %d", len(batch))
        finally:
            streamer.end()


def decode_joins_with_space(tokenizer: Any) -> bool:
    """Whether decoding puts a space between tokens (word level: "w5 w5") or not (BPE)."""
    token = len(tokenizer) // 2  # an ordinary token in either vocabulary
    return bool(tokenizer.decode([token, token]) != tokenizer.decode([token]) * 2)


def create_app(model: Any, tokenizer: Any, adapters: list[str], max_batch: int) -> Any:
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    add_common_routes(app, adapters or ["base"])
    batcher = Batcher(model, tokenizer, max_batch)
    batcher.start()
    spaced = decode_joins_with_space(tokenizer)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> StreamingResponse:
        name = body.model or (adapters[0] if adapters else "base")
        if name not in adapters and name != "base":
            raise HTTPException(404, f"model {name!r} not found; served: {adapters}")
        ids = prompt_ids(tokenizer, body.prompt)
        pending = Pending(ids, name if name in adapters else BASE, body.max_tokens,
                          body.min_new_tokens(), body.ignore_eos, asyncio.get_running_loop(),
                          asyncio.Queue())
        batcher.submit(pending)

        async def texts() -> AsyncIterator[str]:
            first = True
            while (token := await pending.out.get()) is not None:
                text = tokenizer.decode([token], skip_special_tokens=True)
                yield text if first or not text or not spaced else " " + text
                first = False

        return StreamingResponse(stream_events(name, len(ids), texts(), pending.count),
                                 media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    args = parse_args(__doc__ or "")
    adapters = adapter_pairs(args.adapter)
    model, tokenizer = load_peft(args.base, adapters)
    app = create_app(model, tokenizer, list(adapters), args.max_batch_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
