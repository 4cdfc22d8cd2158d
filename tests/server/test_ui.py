"""The Gradio UI at "/", driven in real headless Chromium against a live demo server.

The demo model answers its training questions exactly under greedy decoding, so each test
sets temperature 0 and checks for the trained answer. Screenshots land in each test's tmp_path.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tuneserve.models.demo import ADAPTER_EXAMPLES, BASE_EXAMPLES
from tuneserve.server.ui import build_messages, format_usage, message_text

logger = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
API_KEY = "ui-test-key"
# Generous: two cores shared with other test processes; a reply takes well under this.
TIMEOUT_MS = 60_000
PLAYWRIGHT_DEFAULT_TIMEOUT_MS = 5_000

QUESTION_MESSAGES, CAPITALS_ANSWER = ADAPTER_EXAMPLES["capitals"][0]
QUESTION = QUESTION_MESSAGES[-1]["content"]
BASE_ANSWER = next(answer for messages, answer in BASE_EXAMPLES if messages == QUESTION_MESSAGES)
USAGE = re.compile(
    r"prompt tokens:\s*(\d+)\s*·\s*completion tokens:\s*(\d+)\s*·\s*finish reason:\s*(\w+)"
)

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")


# -- pure helpers (no browser) -----------------------------------------------------------
def test_message_text_flattens_gradio6_content_parts() -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert message_text(parts) == "Hello there"
    assert message_text("plain") == "plain"
    assert message_text(None) == ""


def test_build_messages_keeps_system_prompt_and_history() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nice to meet you, Ada."}]},
    ]
    assert build_messages(history, "What is my name?", "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    # A blank system prompt sends no system message at all.
    assert build_messages([], "Hi", "  ")[0] == {"role": "user", "content": "Hi"}


def test_format_usage_before_and_after_the_last_delta() -> None:
    from tuneserve.engine.types import StreamDelta

    assert format_usage(None) == ""
    assert "generating" in format_usage(None, status="generating…")
    done = StreamDelta("", finish_reason="length", prompt_tokens=12, completion_tokens=7)
    shown = format_usage(done).replace("*", "")  # as rendered: the markdown bold is gone
    match = USAGE.search(shown)
    assert match and match.groups() == ("12", "7", "length"), shown


# -- browser fixtures and helpers --------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=TIMEOUT_MS)
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            yield chromium
            chromium.close()
    finally:
        expect.set_options(timeout=PLAYWRIGHT_DEFAULT_TIMEOUT_MS)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1300, "height": 950})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def locked_server(demo_server_factory: Callable[..., Any]) -> Any:
    """A server with an API key and a small context, so a long prompt overflows it."""
    return demo_server_factory(api_key=API_KEY, max_model_len=96)


def open_ui(page: Page, url: str) -> None:
    page.goto(url + "/", wait_until="load")
    expect(page.locator("#chat-input textarea")).to_be_visible()


def pick(page: Page, dropdown: str, value: str) -> None:
    box = page.locator(f"#{dropdown} input")
    box.click()
    # Each dropdown's options live in the listbox its input controls (not inside its element).
    listbox = page.locator(f"#{box.get_attribute('aria-controls')}")
    listbox.get_by_role("option", name=value, exact=True).click()
    expect(box).to_have_value(value)


def set_slider(page: Page, slider: str, value: float) -> None:
    box = page.locator(f"#{slider} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    expect(page.locator(f"#{slider} input[type=range]")).to_have_value(str(value))


def record_bot_texts(page: Page, container: str) -> None:
    """Record every text the newest bot message shows, to prove the reply streams."""
    page.evaluate(
        """(selector) => {
            window.__seen = [];
            const root = document.querySelector(selector);
            new MutationObserver(() => {
                const bots = root.querySelectorAll('[data-testid="bot"]');
                if (bots.length) window.__seen.push(bots[bots.length - 1].innerText.trim());
            }).observe(root, {subtree: true, childList: true, characterData: true});
        }""",
        f"#{container}",
    )


def usage_of(page: Page, element: str) -> tuple[int, int, str]:
    locator = page.locator(f"#{element}")
    expect(locator).to_contain_text(re.compile(r"finish reason:\s*(stop|length)"))
    match = USAGE.search(locator.inner_text())
    assert match, locator.inner_text()
    return int(match[1]), int(match[2]), match[3]


def api_usage(url: str, model: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The same request through the OpenAI route: the UI must count tokens the same way."""
    body = {"model": model, "messages": QUESTION_MESSAGES, "temperature": 0, "max_tokens": 256}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def shot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    logger.info("screenshot: %s", path)


# -- the UI ------------------------------------------------------------------------------
@needs_chromium
def test_chat_streams_the_adapters_trained_answer(
    page: Page, demo_server: Any, tmp_path: Path
) -> None:
    open_ui(page, demo_server.url)
    header = page.locator("#header")
    expect(header).to_contain_text("capitals")
    expect(header).to_contain_text("/v1/chat/completions")

    pick(page, "chat-model", "capitals")
    set_slider(page, "temperature", 0)
    record_bot_texts(page, "chatbot")
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-input textarea").press("Enter")

    bot = page.locator("#chatbot [data-testid=bot]").last
    expect(bot).to_have_text(CAPITALS_ANSWER)
    prompt_tokens, completion_tokens, finish = usage_of(page, "chat-usage")
    shot(page, tmp_path / "chat.png")

    assert finish == "stop"
    api = api_usage(demo_server.url, "capitals")
    assert api["choices"][0]["message"]["content"] == CAPITALS_ANSWER
    assert (prompt_tokens, completion_tokens) == (
        api["usage"]["prompt_tokens"],
        api["usage"]["completion_tokens"],
    )
    seen: list[str] = page.evaluate("window.__seen")
    partial = [text for text in seen if text and text != CAPITALS_ANSWER]
    assert partial, f"the reply arrived in one piece, not streamed: {seen}"
    assert all(CAPITALS_ANSWER.startswith(text) for text in partial), seen
    expect(page.locator("#chat-input textarea")).to_have_value("")

    # Clear empties the conversation and the counts.
    page.locator("#chat-clear").click()
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(0)
    expect(page.locator("#chat-usage")).not_to_contain_text("prompt tokens")


@needs_chromium
def test_compare_streams_base_and_adapter_side_by_side(
    page: Page, demo_server: Any, tmp_path: Path
) -> None:
    models = httpx.get(f"{demo_server.url}/v1/models", timeout=30).json()["data"]
    base = next(m["id"] for m in models if m["id"] not in ADAPTER_EXAMPLES)
    open_ui(page, demo_server.url)
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-model-a input")).to_have_value(base)  # the default pair
    pick(page, "compare-model-a", base)
    pick(page, "compare-model-b", "capitals")
    set_slider(page, "temperature", 0)
    page.locator("#compare-input textarea").fill(QUESTION)
    page.locator("#compare-send").click()

    bot_a = page.locator("#compare-chat-a [data-testid=bot]").last
    bot_b = page.locator("#compare-chat-b [data-testid=bot]").last
    expect(bot_a).to_have_text(BASE_ANSWER)
    expect(bot_b).to_have_text(CAPITALS_ANSWER)
    usage_a = usage_of(page, "compare-usage-a")
    usage_b = usage_of(page, "compare-usage-b")
    shot(page, tmp_path / "compare.png")

    assert BASE_ANSWER != CAPITALS_ANSWER
    assert usage_a[2] == usage_b[2] == "stop"
    assert usage_a[0] == usage_b[0] > 0  # the same prompt on both sides
    assert usage_a[1] > 0 and usage_b[1] > 0


@needs_chromium
def test_api_key_guards_the_ui(page: Page, locked_server: Any, tmp_path: Path) -> None:
    # Gradio's own routes refuse a caller that has not logged in: no back door around the key.
    assert httpx.get(f"{locked_server.url}/config", timeout=30).status_code == 401

    page.goto(locked_server.url + "/", wait_until="load")
    expect(page.get_by_role("button", name="Login")).to_be_visible()
    expect(page.get_by_text("password = the server's API key")).to_be_visible()
    expect(page.locator("#chat-input")).to_have_count(0)

    page.get_by_label("username").fill("someone")
    page.get_by_label("password").fill("not-the-key")
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    shot(page, tmp_path / "login-refused.png")
    expect(page.locator("#chat-input")).to_have_count(0)

    page.get_by_label("username").fill("someone")
    page.get_by_label("password").fill(API_KEY)
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#chat-input textarea")).to_be_visible()

    pick(page, "chat-model", "capitals")
    set_slider(page, "temperature", 0)
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-send").click()
    expect(page.locator("#chatbot [data-testid=bot]").last).to_have_text(CAPITALS_ANSWER)
    shot(page, tmp_path / "logged-in.png")


@needs_chromium
def test_a_prompt_longer_than_the_context_is_a_warning_not_a_crash(
    page: Page, locked_server: Any, tmp_path: Path
) -> None:
    page.goto(locked_server.url + "/", wait_until="load")
    page.get_by_label("username").fill("someone")
    page.get_by_label("password").fill(API_KEY)
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#chat-input textarea")).to_be_visible()

    pick(page, "chat-model", "capitals")
    too_long = " ".join([QUESTION] * 40)
    page.locator("#chat-input textarea").fill(too_long)
    page.locator("#chat-send").click()
    toast = page.locator("[data-testid=toast-body]")
    expect(toast).to_contain_text("maximum context length")
    expect(toast).to_have_css("opacity", "1")  # faded in, for the screenshot
    shot(page, tmp_path / "too-long.png")
    # The message comes back for editing and the failed turn is not kept.
    expect(page.locator("#chat-input textarea")).to_have_value(too_long)
    expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0)

    # The UI still works afterwards.
    set_slider(page, "temperature", 0)
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-send").click()
    expect(page.locator("#chatbot [data-testid=bot]").last).to_have_text(CAPITALS_ANSWER)


def dropdown_options(page: Page, dropdown: str) -> list[str]:
    box = page.locator(f"#{dropdown} input")
    box.click()
    listbox = page.locator(f"#{box.get_attribute('aria-controls')}")
    names = [
        text.strip().lstrip("✓").strip() for text in listbox.get_by_role("option").all_inner_texts()
    ]
    # Close by clicking away: after Escape, Gradio 6 lists no options once the choices change.
    page.locator("#header").click()
    return names


def wait_for_options(page: Page, dropdown: str, present: str, *, absent: bool = False) -> None:
    """Poll the dropdown (the page refreshes its names every few seconds)."""
    for _ in range(40):
        if (present in dropdown_options(page, dropdown)) != absent:
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"{present!r} {'still' if absent else 'never'} listed in #{dropdown}")


@needs_chromium
def test_the_model_dropdowns_follow_adapters_loaded_at_runtime(
    page: Page, demo_server_factory: Callable[..., Any], demo_paths: Any, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "adapters"
    root.mkdir()
    admin = {"Authorization": "Bearer admin-key"}  # the UI needs no key, the admin routes do
    server = demo_server_factory(
        app={"adapter_root": root, "rescan_interval": 0, "admin_key": "admin-key"}
    )
    open_ui(page, server.url)
    assert "fresh" not in dropdown_options(page, "chat-model")

    shutil.copytree(demo_paths.adapters["capitals"], root / "fresh-v1")
    loaded = httpx.post(
        f"{server.url}/v1/adapters",
        json={"name": "fresh", "path": "fresh-v1"},
        headers=admin,
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    wait_for_options(page, "chat-model", "fresh")  # no reload of the page
    expect(page.locator("#header")).to_contain_text("fresh")
    page.get_by_role("tab", name="Compare").click()
    wait_for_options(page, "compare-model-b", "fresh")
    page.get_by_role("tab", name="Chat").click()

    pick(page, "chat-model", "fresh")
    set_slider(page, "temperature", 0)
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-input textarea").press("Enter")
    expect(page.locator("#chatbot [data-testid=bot]").last).to_have_text(CAPITALS_ANSWER)

    deleted = httpx.delete(f"{server.url}/v1/adapters/fresh", headers=admin, timeout=60)
    assert deleted.status_code == 200
    wait_for_options(page, "chat-model", "fresh", absent=True)
    shot(page, tmp_path / "after-unload.png")


@needs_chromium
def test_a_json_schema_makes_the_reply_json_that_validates(
    page: Page, demo_server: Any, tmp_path: Path
) -> None:
    open_ui(page, demo_server.url)
    pick(page, "chat-model", "capitals")
    page.locator("#schema-accordion").get_by_text("Structured output").click()
    editor = page.locator("#json-schema .cm-content")
    editor.click()
    page.keyboard.insert_text("{not json")
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-send").click()
    expect(page.locator("[data-testid=toast-body]").last).to_contain_text("not valid JSON")
    expect(page.locator("#chat-input textarea")).to_have_value(QUESTION)  # back for editing

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 12}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(json.dumps(schema))
    page.locator("#chat-send").click()
    expect(page.locator("#chat-usage")).to_contain_text("finish reason: stop")
    reply = json.loads(page.locator("#chatbot [data-testid=bot]").last.inner_text())
    shot(page, tmp_path / "json-schema.png")
    assert set(reply) == {"answer"} and len(reply["answer"]) <= 12
