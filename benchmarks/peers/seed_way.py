"""seed-way: the AI Toolkit inference template's way of serving a fine-tune.

One PEFT model; each request is generated alone with `model.generate` in a thread, its text read
back through `TextIteratorStreamer`; requests take turns (a FIFO lock), so the machine works on
one sequence at a time. With several adapters, `set_adapter(name)` before each request.

    python -m benchmarks.peers.seed_way --base DIR --adapter a0=DIR [--adapter ...] --port P

Speaks streaming `/v1/completions` only (what the harness sends).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
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


def make_streamer(tokenizer: Any, count: list[int]) -> Any:
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        """The template's streamer, plus a count of the tokens made (for the usage chunk)."""

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                count[0] += int(value.numel())
            super().put(value)

    return CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def create_app(model: Any, tokenizer: Any, adapters: list[str]) -> Any:
    import torch
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    add_common_routes(app, adapters or ["base"])
    turn = asyncio.Lock()  # one request at a time, first come first served

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> StreamingResponse:
        name = body.model or (adapters[0] if adapters else "base")
        if adapters and name not in adapters:
            raise HTTPException(404, f"model {name!r} not found; served: {adapters}")
        ids = prompt_ids(tokenizer, body.prompt)
        count = [0]

        async def texts() -> AsyncIterator[str]:
            async with turn:
                if adapters:
                    model.set_adapter(name)
                streamer = make_streamer(tokenizer, count)
                kwargs = dict(
                    input_ids=torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=body.max_tokens,
                    min_new_tokens=body.min_new_tokens(),
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    streamer=streamer,
                )
                thread = threading.Thread(target=_generate, args=(model, kwargs))
                thread.start()
                iterator = iter(streamer)
                while (text := await asyncio.to_thread(next, iterator, None)) is not None:
                    yield text
                await asyncio.to_thread(thread.join)

        return StreamingResponse(stream_events(name, len(ids), texts(), count),
                                 media_type="text/event-stream")

    return app


def _generate(model: Any, kwargs: dict[str, Any]) -> None:
    import torch

    try:
        with torch.inference_mode():
            model.generate(**kwargs)
    except BaseException:
        kwargs["streamer"].end()  # a failed generate must not leave the reader waiting
        raise


def main() -> None:
    import uvicorn

    args = parse_args(__doc__ or "")
    adapters = adapter_pairs(args.adapter)
    model, tokenizer = load_peft(args.base, adapters)
    app = create_app(model, tokenizer, list(adapters))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
