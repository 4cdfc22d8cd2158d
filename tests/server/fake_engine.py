"""An Engine with no model: it answers with scripted words, so the server can be tested alone.

It keeps what the server asked of it (requests, adapter changes in order) and can hold an
adapter change until a test lets it go, which makes the registry's races reproducible without
a live server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tuneserve.engine.base import Engine, RequestStream
from tuneserve.engine.types import (
    AdapterUsage,
    EngineStats,
    FinishReason,
    GenerationRequest,
    StreamDelta,
)
from tuneserve.errors import AdapterError, EngineError, UnknownAdapterError
from tuneserve.models.chat_template import ensure_chat_template
from tuneserve.models.types import AdapterSpec, ServedModel

BASE = "fake-base"
VOCAB = 1000


def echo_script(request: GenerationRequest) -> list[str]:
    """Which model answered and how long the prompt was: enough to tell requests apart."""
    return [request.adapter or BASE, " heard", f" {len(request.prompt_ids)}", " tokens"]


class FakeStream(RequestStream):
    def __init__(self, request_id: str, words: list[str], max_tokens: int) -> None:
        self.request_id = request_id
        self.words = words[:max_tokens]
        self.finish: FinishReason = "length" if len(words) > max_tokens else "stop"
        self.prompt_tokens = 0
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        for i, word in enumerate(self.words):
            await asyncio.sleep(0)  # another request's deltas may come in between
            if self.cancelled:
                return
            last = i == len(self.words) - 1
            yield StreamDelta(
                text=word,
                token_ids=[i],
                finish_reason=self.finish if last else None,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=i + 1,
            )

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine(Engine):
    def __init__(
        self,
        adapters: dict[str, AdapterSpec] | None = None,
        script: Callable[[GenerationRequest], list[str]] = echo_script,
    ) -> None:
        self.script = script
        self._adapters = dict(adapters or {})
        self.running = False
        self.requests: list[GenerationRequest] = []
        self.changes: list[tuple[str, str, Path | None]] = []  # (verb, name, path) in order
        self.refuse: dict[str, str] = {}  # adapter name -> why validate_adapter refuses it
        self.hold = threading.Event()  # cleared: add_adapter waits until a test sets it
        self.hold.set()
        self.entered = threading.Event()  # set when an add_adapter has started

    def start(self) -> None:
        self.running = True

    def shutdown(self) -> None:
        self.running = False

    @property
    def is_running(self) -> bool:
        return self.running

    @property
    def adapters(self) -> dict[str, AdapterSpec]:
        return dict(self._adapters)

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def validate_adapter(self, spec: AdapterSpec) -> None:
        if spec.name in self.refuse:
            raise AdapterError(spec.name, self.refuse[spec.name])

    def add_adapter(self, spec: AdapterSpec) -> None:
        self.entered.set()
        if not self.hold.wait(timeout=30):
            raise EngineError("the test never released add_adapter")
        self.changes.append(("add", spec.name, spec.path))
        self._adapters = {**self._adapters, spec.name: spec}

    def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise UnknownAdapterError(name, list(self._adapters))
        self.changes.append(("remove", name, None))
        self._adapters = {k: v for k, v in self._adapters.items() if k != name}

    def adapter_usage(self) -> dict[str, AdapterUsage]:
        return {name: AdapterUsage(state="hot", last_used=None) for name in self._adapters}

    def submit(self, request: GenerationRequest) -> RequestStream:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise UnknownAdapterError(request.adapter, list(self._adapters))
        self.requests.append(request)
        stream = FakeStream(request.request_id, self.script(request), request.params.max_tokens)
        stream.prompt_tokens = len(request.prompt_ids)
        return stream

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0)


def fake_served(tokenizer: Any, adapters: dict[str, AdapterSpec] | None = None) -> ServedModel:
    ensure_chat_template(tokenizer)
    return ServedModel(
        base_name=BASE,
        base_path="nowhere/fake-base",
        tokenizer=tokenizer,
        adapters=dict(adapters or {}),
        max_model_len=256,
        eos_token_ids=(tokenizer.eos_token_id,),
    )


def write_adapter(folder: Path, rank: int = 4) -> Path:
    """A PEFT adapter folder as far as reading it goes: the fake engine never opens weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        f'{{"peft_type": "LORA", "r": {rank}, "lora_alpha": 8, "target_modules": ["q_proj"]}}'
    )
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * (16 * rank))
    return folder
