"""The UI's event handlers against a fake service: Stop, Clear, refusals and Compare, without
a browser (tests/server/test_ui.py drives the real page)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from tuneserve.engine.types import SamplingParams, StreamDelta
from tuneserve.server.errors import ModelNotFoundError
from tuneserve.server.ui import ChatHandlers

# Outside a Gradio event gr.Warning falls back to warnings.warn.
refusal_warning = pytest.mark.filterwarnings("ignore:missing. The model:UserWarning")
SETTINGS = ("", 64.0, 0.0, 1.0, 0.0)  # system prompt, max new tokens, temperature, top-p, top-k


class FakeService:
    """chat_stream as the UI calls it: "slow" never finishes, "missing" is refused."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.fits: list[bool] = []

    async def chat_stream(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams,
        *,
        fit: bool = False,
    ) -> AsyncGenerator[StreamDelta, None]:
        self.fits.append(fit)
        if model == "missing":
            raise ModelNotFoundError(model, ["base", "slow"])
        try:
            for n in range(1, 1_000_000 if model == "slow" else 3):
                await asyncio.sleep(0.01)
                finish: Literal["stop"] | None = None if model == "slow" or n < 2 else "stop"
                yield StreamDelta(
                    text=f"{model}{n} ",
                    token_ids=[n],
                    prompt_tokens=5,
                    completion_tokens=n,
                    finish_reason=finish,
                )
        except BaseException:
            self.cancelled.append(model)
            raise


def _request() -> Any:
    return SimpleNamespace(session_hash="tab-1")


async def _last(events: Any, *, after: int | None = None, then: Any = None) -> Any:
    """The last update of an event; `then()` runs once `after` updates have come."""
    last = None
    count = 0
    async for update in events:
        last = update
        count += 1
        if count == after:
            then()
    return last


def test_stop_keeps_the_partial_reply_and_says_stopped() -> None:
    async def main() -> None:
        service = FakeService()
        handlers = ChatHandlers(service)  # type: ignore[arg-type]
        events = handlers.chat("hi", [], "slow", "", *SETTINGS, _request())
        stop = lambda: handlers.stop_chat(_request())  # noqa: E731
        box, chat, usage = await _last(events, after=3, then=stop)
        assert box == ""
        assert chat[-1]["role"] == "assistant" and chat[-1]["content"].startswith("slow1 ")
        assert "finish reason:** stopped" in usage
        assert service.cancelled == ["slow"]
        assert service.fits == [True]  # the UI asks the service to cap max_tokens

    asyncio.run(main())


def test_clear_discards_the_reply_still_streaming() -> None:
    async def main() -> None:
        service = FakeService()
        handlers = ChatHandlers(service)  # type: ignore[arg-type]
        events = handlers.chat("hi", [], "slow", "", *SETTINGS, _request())
        updates = 0
        async for _ in events:
            updates += 1
            if updates == 2:
                assert handlers.clear_chat(_request()) == ([], "", "")
        assert updates == 2  # nothing more shown after Clear
        assert service.cancelled == ["slow"]

    asyncio.run(main())


@refusal_warning
def test_a_refused_request_gives_the_message_back() -> None:
    async def main() -> None:
        handlers = ChatHandlers(FakeService())  # type: ignore[arg-type]
        history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        events = handlers.chat("hi", history, "missing", "", *SETTINGS, _request())
        box, chat, usage = await _last(events)
        assert box == "hi"
        assert chat == history
        assert usage.startswith("⚠️") and "missing" in usage

    asyncio.run(main())


@refusal_warning
def test_compare_streams_both_and_one_refusal_spares_the_other() -> None:
    async def main() -> None:
        handlers = ChatHandlers(FakeService())  # type: ignore[arg-type]
        events = handlers.compare("hi", "base", "missing", *SETTINGS, _request())
        a, usage_a, b, usage_b = await _last(events)
        assert a[-1]["content"] == "base1 base2 "
        assert "finish reason:** stop" in usage_a
        assert usage_b.startswith("⚠️") and "missing" in b[-1]["content"]

    asyncio.run(main())


def test_stop_in_compare_stops_both_sides() -> None:
    async def main() -> None:
        service = FakeService()
        handlers = ChatHandlers(service)  # type: ignore[arg-type]
        events = handlers.compare("hi", "slow", "base", *SETTINGS, _request())
        stop = lambda: handlers.stop_compare(_request())  # noqa: E731
        a, usage_a, b, usage_b = await _last(events, after=4, then=stop)
        assert "stopped" in usage_a
        assert "slow" in service.cancelled

    asyncio.run(main())
