"""The Gradio chat UI mounted at "/": a Chat tab and a side-by-side Compare tab.

Handlers call the engine in-process through GenerationService.chat_stream (no HTTP round
trip to ourselves), so the UI validates and counts tokens exactly like the OpenAI routes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr
from fastapi import FastAPI

from tuneserve.engine.grammar import ConstraintError, check_constraint
from tuneserve.engine.types import Constraint, SamplingParams, StreamDelta
from tuneserve.errors import TuneserveError
from tuneserve.server.errors import APIError
from tuneserve.server.generation import GenerationService
from tuneserve.server.streaming import merge_streams

logger = logging.getLogger(__name__)

# The template's defaults (max new tokens 250, top-p 0.95, top-k 50, temperature 0.8),
# with the token budget rounded to a power of two.
MAX_NEW_TOKENS = 1024
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 50
MODELS_REFRESH_S = 3.0  # how soon an open page sees adapters loaded or unloaded elsewhere

AUTH_MESSAGE = (
    "This tuneserve server is protected by an API key. "
    "Log in with any username; password = the server's API key."
)

Message = dict[str, Any]


# -- pure helpers ------------------------------------------------------------------------
def message_text(content: Any) -> str:
    """Plain text of a Chatbot message's content.

    Gradio 6 hands history back normalised to a list of parts ({"type": "text", "text": ...});
    the chat template wants one string per message.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    return ""


def build_messages(history: Sequence[Message], message: str, system: str) -> list[Message]:
    """The whole conversation for the chat template: system prompt, history, new turn."""
    messages: list[Message] = []
    if system.strip():
        messages.append({"role": "system", "content": system})
    for turn in history:
        messages.append({"role": turn["role"], "content": message_text(turn.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


def sampling_params(
    max_new_tokens: float, temperature: float, top_p: float, top_k: float
) -> SamplingParams:
    # Sliders deliver floats; the engine wants exact ints for counts.
    return SamplingParams(
        max_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
    )


def schema_constraint(text: str) -> Constraint | None:
    """The Chat tab's JSON-schema box as a constraint (None when empty); ValueError says what
    is wrong with it."""
    if not text or not text.strip():
        return None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"JSON schema: not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("JSON schema: must be a JSON object")
    constraint = Constraint("json_schema", json.dumps(schema))
    try:
        check_constraint(constraint)
    except ConstraintError as exc:
        raise ValueError(f"JSON schema: cannot be enforced: {exc}") from None
    return constraint


def format_usage(delta: StreamDelta | None, *, status: str | None = None) -> str:
    """The token-count line under a reply; `status` ("generating…", "stopped") stands in for
    the finish reason while there is none yet, or instead of it."""
    if delta is None:
        return f"*{status}*" if status else ""
    finish = status or delta.finish_reason or "-"
    return (
        f"**prompt tokens:** {delta.prompt_tokens} · "
        f"**completion tokens:** {delta.completion_tokens} · "
        f"**finish reason:** {finish}"
    )


def error_text(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return exc.message
    if isinstance(exc, TuneserveError):
        return str(exc)
    return f"Generation failed ({type(exc).__name__}); see the server log."


def header_markdown(
    service: GenerationService,
    *,
    api_key: str | None,
    notice: str | None = None,
    about: str | None = None,
) -> str:
    served = service.served
    adapters = service.engine.adapter_names
    listed = ", ".join(f"`{name}`" for name in adapters) if adapters else "none"
    lines = [
        "## tuneserve",
        f"**Base model:** `{served.base_name}` · **Adapters:** {listed}",
    ]
    if about:
        lines.append(about)
    if notice:
        lines.append(f"**⚠ {notice}**")
    if served.adapter_errors:
        skipped = "; ".join(f"`{name}`: {why}" for name, why in served.adapter_errors.items())
        lines.append(f"**Not served:** {skipped}")
    auth = " with `Authorization: Bearer <API key>`" if api_key else ""
    lines.append(
        f"**API:** OpenAI-compatible `POST /v1/chat/completions`{auth} — `model` is an adapter "
        f"name, or `{served.base_name}` for the bare base model. "
        "Reference: [/docs](/docs)."
    )
    return "\n\n".join(lines)


def default_model(model_ids: Sequence[str]) -> str:
    """The first adapter if any, else the base (model_ids lists the base first)."""
    return model_ids[1] if len(model_ids) > 1 else model_ids[0]


# -- handlers ----------------------------------------------------------------------------
GENERATING = "generating…"
STOPPED = "stopped"


@dataclass
class _Side:
    """One reply while it streams: the Chat tab has one, the Compare tab two."""

    model: str
    text: str = ""
    last: StreamDelta | None = None
    error: str | None = None
    stopped: bool = False
    done: bool = False

    @property
    def ended(self) -> bool:
        """Finished or failed on its own (not merely cut short)."""
        return self.error is not None or (
            self.last is not None and self.last.finish_reason is not None
        )

    def reply(self) -> str:
        return self.text if self.error is None else f"{self.text}\n\n⚠️ {self.error}".strip()

    def usage(self) -> str:
        if self.error is not None:
            return f"⚠️ {self.error}"
        if self.stopped:
            return format_usage(self.last, status=STOPPED)
        return format_usage(self.last, status=None if self.done or self.ended else GENERATING)


@dataclass
class _Run:
    """The generation of one event, for Stop and Clear to reach."""

    task: asyncio.Task[None]
    discarded: bool = False  # Clear: show nothing more of this run


class ChatHandlers:
    """The handlers behind the UI's events, bound to one service.

    Each event's replies are generated by one task that reads `merge_streams` over its sides
    and feeds them; the event's async generator turns side changes into UI updates. Stop
    cancels that task directly, rather than through Gradio's `cancels=`: that kills the event
    mid-stream and can leave the outputs showing "Error" (seen with gradio 6.31), while a
    cancelled task lets the event finish normally with the partial reply and "stopped".
    """

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self._runs: dict[str, _Run] = {}

    async def chat(
        self,
        message: str,
        history: list[Message],
        model: str,
        schema: str,
        system: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, Any, Any]]:
        """Stream one reply; yields (input box, chatbot, usage line)."""
        if not message or not message.strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        messages = build_messages(history, message, system)
        params = sampling_params(max_new_tokens, temperature, top_p, top_k)
        before = [{"role": m["role"], "content": message_text(m.get("content"))} for m in history]
        try:
            params = replace(params, constraint=schema_constraint(schema))
        except ValueError as exc:
            gr.Warning(str(exc))
            yield message, before, f"⚠️ {exc}"
            return
        turn = {"role": "user", "content": message}
        side = _Side(model)
        async with aclosing(self._run([side], messages, params, _key(request, "chat"))) as runs:
            async for _ in runs:
                if side.error is not None and not side.text:
                    # Refused before any token: give the message back for editing and keep
                    # the failed turn out of the conversation.
                    yield message, before, side.usage()
                    continue
                shown = [*before, turn, {"role": "assistant", "content": side.reply()}]
                yield "", shown, side.usage()

    async def compare(
        self,
        prompt: str,
        model_a: str,
        model_b: str,
        system: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, Any, Any, Any]]:
        """Stream two models' replies to one prompt at once; yields both chats and usages."""
        if not prompt or not prompt.strip():
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        messages = build_messages([], prompt, system)
        params = sampling_params(max_new_tokens, temperature, top_p, top_k)
        sides = [_Side(model_a), _Side(model_b)]
        turn = {"role": "user", "content": prompt}
        runs = self._run(sides, messages, params, _key(request, "compare"))
        async with aclosing(runs):
            async for _ in runs:
                a, b = ([turn, {"role": "assistant", "content": s.reply()}] for s in sides)
                yield a, sides[0].usage(), b, sides[1].usage()

    def stop_chat(self, request: gr.Request) -> None:
        self._stop(_key(request, "chat"))

    def stop_compare(self, request: gr.Request) -> None:
        self._stop(_key(request, "compare"))

    def clear_chat(self, request: gr.Request) -> tuple[list[Message], str, str]:
        """Empty the chat; a reply still streaming is stopped and shows nothing more."""
        self._stop(_key(request, "chat"), discard=True)
        return [], "", ""

    def _stop(self, key: str, *, discard: bool = False) -> None:
        run = self._runs.get(key)
        if run is None:
            return
        run.discarded = run.discarded or discard
        run.task.cancel()

    async def _run(
        self, sides: list[_Side], messages: list[Message], params: SamplingParams, key: str
    ) -> AsyncGenerator[None, None]:
        """Generate every side at once; yield whenever any of them changed, last when all end."""
        changed = asyncio.Event()

        def ended(task: asyncio.Task[None]) -> None:
            # A callback, not a `finally`: it also runs for a task cancelled before it started.
            for side in sides:
                # Stopped: cut short by Stop, Clear or a closed page, not finished on its own.
                side.stopped = task.cancelled() and not side.ended
                side.done = True
            changed.set()

        run = _Run(asyncio.create_task(self._generate(sides, messages, params, changed)))
        run.task.add_done_callback(ended)
        self._runs[key] = run  # a new run in the same tab takes over Stop
        try:
            while not run.discarded:
                # Coalesce a burst of deltas into one UI update. Clear before reading `done`:
                # a side that finishes later still wakes the wait() below.
                changed.clear()
                finished = all(side.done for side in sides)
                yield
                if finished:
                    break
                await changed.wait()
        finally:
            # Also reached when Gradio closes the event (the page went away): stop generating.
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
            if self._runs.get(key) is run:
                del self._runs[key]

    async def _generate(
        self,
        sides: list[_Side],
        messages: list[Message],
        params: SamplingParams,
        changed: asyncio.Event,
    ) -> None:
        """Feed the sides from one merged stream; cancelling this stops every side."""
        # Cancelling this task closes the merged stream, which cancels the engine requests.
        streams = [self._side_stream(side, messages, params) for side in sides]
        async with aclosing(merge_streams(streams)) as merged:
            async for index, delta in merged:
                sides[index].text += delta.text
                sides[index].last = delta
                changed.set()

    async def _side_stream(
        self, side: _Side, messages: list[Message], params: SamplingParams
    ) -> AsyncGenerator[StreamDelta, None]:
        """One side's deltas; a failure ends this side with its message, not the others."""
        stream = self.service.chat_stream(side.model, messages, params, fit=True)
        try:
            async with aclosing(stream):
                async for delta in stream:
                    yield delta
        except Exception as exc:  # noqa: BLE001 - any failure becomes a message, not a crash
            side.error = self._report(exc, side.model)

    @staticmethod
    def _report(exc: Exception, model: str) -> str:
        text = error_text(exc)
        if isinstance(exc, (APIError, TuneserveError)):
            logger.info("UI request for %r refused: %s", model, text)
        else:
            logger.exception("UI generation for %r failed", model)
        gr.Warning(f"{model}: {text}")
        return text


def _key(request: gr.Request, tab: str) -> str:
    # One browser tab's session, one UI tab: Stop in Chat must not stop a comparison.
    return f"{request.session_hash}:{tab}"


# -- layout ------------------------------------------------------------------------------
@dataclass
class _ChatTab:
    model: gr.Dropdown
    chatbot: gr.Chatbot
    input: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    usage: gr.Markdown
    schema: gr.Code


@dataclass
class _CompareTab:
    model_a: gr.Dropdown
    model_b: gr.Dropdown
    input: gr.Textbox
    send: gr.Button
    stop: gr.Button
    chat_a: gr.Chatbot
    usage_a: gr.Markdown
    chat_b: gr.Chatbot
    usage_b: gr.Markdown


def _chat_tab(ids: list[str]) -> _ChatTab:
    model = gr.Dropdown(ids, value=default_model(ids), label="Model", elem_id="chat-model")
    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
    with gr.Row():
        text = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            scale=5,
            elem_id="chat-input",
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        stop = gr.Button("Stop", size="sm", elem_id="chat-stop")
        clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
    usage = gr.Markdown("", elem_id="chat-usage")
    with gr.Accordion("Structured output (optional)", open=False, elem_id="schema-accordion"):
        schema = gr.Code(
            value="",
            language="json",
            label="JSON schema: the reply will be JSON that validates against it",
            elem_id="json-schema",
        )
    return _ChatTab(model, chatbot, text, send, stop, clear, usage, schema)


def _compare_tab(ids: list[str]) -> _CompareTab:
    with gr.Row():
        model_a = gr.Dropdown(ids, value=ids[0], label="Model A", elem_id="compare-model-a")
        model_b = gr.Dropdown(
            ids, value=default_model(ids), label="Model B", elem_id="compare-model-b"
        )
    with gr.Row():
        text = gr.Textbox(
            placeholder="One prompt, sent to both models",
            show_label=False,
            scale=5,
            elem_id="compare-input",
        )
        with gr.Column(scale=1, min_width=120):
            send = gr.Button("Send", variant="primary", elem_id="compare-send")
            stop = gr.Button("Stop", size="sm", elem_id="compare-stop")
    with gr.Row():
        with gr.Column():
            chat_a = gr.Chatbot(label="A", elem_id="compare-chat-a", height=360)
            usage_a = gr.Markdown("", elem_id="compare-usage-a")
        with gr.Column():
            chat_b = gr.Chatbot(label="B", elem_id="compare-chat-b", height=360)
            usage_b = gr.Markdown("", elem_id="compare-usage-b")
    return _CompareTab(model_a, model_b, text, send, stop, chat_a, usage_a, chat_b, usage_b)


def _settings() -> list[gr.Component]:
    """System prompt and sampling sliders, shared by both tabs (in handler argument order)."""
    gr.Markdown("### Generation settings\nShared by both tabs.")
    return [
        gr.Textbox(label="System prompt", lines=3, placeholder="(none)", elem_id="system-prompt"),
        gr.Slider(
            1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1,
            label="Max new tokens", elem_id="max-new-tokens",
        ),
        gr.Slider(
            0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05,
            label="Temperature (0 = greedy)", elem_id="temperature",
        ),
        gr.Slider(0.0, 1.0, value=DEFAULT_TOP_P, step=0.01, label="Top-p", elem_id="top-p"),
        gr.Slider(0, 200, value=DEFAULT_TOP_K, step=1, label="Top-k (0 = off)", elem_id="top-k"),
    ]  # fmt: skip


def build_ui(
    service: GenerationService,
    *,
    api_key: str | None = None,
    notice: str | None = None,
    about: str | None = None,
) -> gr.Blocks:
    """The Blocks (not yet mounted: see mount_ui): header, Chat and Compare tabs, shared
    settings. `notice` is a warning for the header (e.g. an open server on a network), `about`
    a line saying what is served."""
    handlers = ChatHandlers(service)
    ids = service.model_ids()
    # The engine batches and queues; Gradio's default of one run at a time would serialise users.
    run: dict[str, Any] = {
        "concurrency_limit": None,
        "api_visibility": "private",
        "show_progress": "minimal",
    }

    with gr.Blocks(title="tuneserve", analytics_enabled=False) as blocks:
        header = gr.Markdown(
            header_markdown(service, api_key=api_key, notice=notice, about=about), elem_id="header"
        )
        with gr.Row():
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    chat = _chat_tab(ids)
                with gr.Tab("Compare", id="compare"):
                    compare = _compare_tab(ids)
            with gr.Column(scale=1):
                sampling = _settings()

        chat_io: dict[str, Any] = {
            "fn": handlers.chat,
            "inputs": [chat.input, chat.chatbot, chat.model, chat.schema, *sampling],
            "outputs": [chat.input, chat.chatbot, chat.usage],
            **run,
        }
        chat.input.submit(**chat_io)
        chat.send.click(**chat_io)
        chat.stop.click(handlers.stop_chat, queue=False, api_visibility="private")
        chat.clear.click(
            handlers.clear_chat,
            outputs=[chat.chatbot, chat.usage, chat.input],
            queue=False,
            api_visibility="private",
        )

        compare_io: dict[str, Any] = {
            "fn": handlers.compare,
            "inputs": [compare.input, compare.model_a, compare.model_b, *sampling],
            "outputs": [compare.chat_a, compare.usage_a, compare.chat_b, compare.usage_b],
            **run,
        }
        compare.input.submit(**compare_io)
        compare.send.click(**compare_io)
        compare.stop.click(handlers.stop_compare, queue=False, api_visibility="private")

        # Adapters are added and removed at runtime (/v1/adapters, rescans of the share): the
        # names refresh on every visit and, while the page is open, whenever the set changes.
        known = gr.State(ids)
        dropdowns = [chat.model, compare.model_a, compare.model_b]

        def refresh(seen: list[str], *picked: str) -> tuple[Any, ...]:
            choices = service.model_ids()
            if choices == seen:
                return tuple(gr.skip() for _ in range(5))
            fallback = (default_model(choices), choices[0], choices[0])
            return (
                header_markdown(service, api_key=api_key, notice=notice, about=about),
                *(
                    gr.update(choices=choices)
                    if value in choices
                    else gr.update(choices=choices, value=default)
                    for value, default in zip(picked, fallback, strict=True)
                ),
                choices,
            )

        watch: dict[str, Any] = {
            "fn": refresh,
            "inputs": [known, *dropdowns],
            "outputs": [header, *dropdowns, known],
            "queue": False,
            "show_progress": "hidden",
            "api_visibility": "private",
        }
        blocks.load(**watch)
        gr.Timer(MODELS_REFRESH_S).tick(**watch)
    built: gr.Blocks = blocks  # gradio's context manager is untyped
    return built


def _key_checker(api_key: str) -> Callable[[str, str], bool]:
    def check(username: str, password: str) -> bool:
        # Any username: the key is the only secret. Constant-time compare.
        return hmac.compare_digest(password.encode(), api_key.encode())

    return check


def mount_ui(app: FastAPI, blocks: gr.Blocks, *, api_key: str | None = None) -> FastAPI:
    """Mount the UI built by build_ui at "/" (call last: it catches every path not routed
    before).

    With an API key the UI sits behind Gradio's login (any username, password = the key);
    Gradio's own queue and config routes then refuse requests without the login cookie.
    """
    mounted: FastAPI = gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        auth=_key_checker(api_key) if api_key else None,
        auth_message=AUTH_MESSAGE if api_key else None,
        # The programmatic API is /v1 (OpenAI); Gradio's own API page would only confuse.
        footer_links=["gradio", "settings"],
        run_history=False,
    )
    return mounted
