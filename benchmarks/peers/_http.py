"""What the two PEFT peers share: loading, the request body, OpenAI-style SSE chunks, the CLI.

The peers speak just enough of `/v1/completions` for the harness: a text or token-id prompt,
`max_tokens`, `ignore_eos` / `min_tokens`, greedy decoding, streaming with a final usage chunk.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fastapi import FastAPI


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    stream: bool = True
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    def min_new_tokens(self) -> int:
        return self.max_tokens if self.ignore_eos else min(self.min_tokens, self.max_tokens)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a LoRA adapter; repeat for more")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-batch-size", type=int, default=1)
    return parser.parse_args()


def adapter_pairs(specs: list[str]) -> dict[str, Path]:
    pairs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--adapter {spec!r}: expected NAME=PATH")
        pairs[name] = Path(path)
    return pairs


def load_peft(base: Path, adapters: dict[str, Path]) -> tuple[Any, Any]:
    """The base model with every adapter loaded in one PeftModel (eval mode), and the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    items = list(adapters.items())
    if not items:
        return model.eval(), tokenizer
    name, path = items[0]
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
    for name, path in items[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model.eval(), tokenizer


def prompt_ids(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def chunk(request_id: str, model: str, text: str, finish: str | None = None,
          usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {
        "id": request_id, "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return sse(body)


async def stream_events(model: str, prompt_tokens: int,
                        texts: AsyncIterator[str], count: list[int]) -> AsyncIterator[str]:
    """SSE for one request: a chunk per text piece, a final chunk with usage, then [DONE].

    `count[0]` holds the completion tokens made so far (the generator side updates it).
    """
    request_id = f"cmpl-{uuid.uuid4().hex}"
    async for text in texts:
        if text:
            yield chunk(request_id, model, text)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count[0],
             "total_tokens": prompt_tokens + count[0]}
    yield chunk(request_id, model, "", finish="length", usage=usage)
    yield "data: [DONE]\n\n"


def add_common_routes(app: FastAPI, names: list[str]) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
