"""An API key guards /v1/* (OpenAI's 401 shape); probes and metrics stay open.

One server with a key and without the UI: it also shows the plain app's own 404/405 in
OpenAI's shape, and (last) /ready turning 503 once its engine stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import chat_messages
from tests.server.test_errors import assert_openai_error
from tuneserve.models.demo import BASE_EXAMPLES

KEY = "sk-test-7f3a9c"
HELLO, HELLO_ANSWER = BASE_EXAMPLES[0]


@pytest.fixture(scope="module")
def keyed(demo_server_factory: Any) -> Iterator[Any]:
    server = demo_server_factory(api_key=KEY, ui=False)
    yield server
    server.stop()


def make_client(server: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0, timeout=60)


def test_no_key_or_wrong_key_is_401(keyed: Any) -> None:
    for key in ("wrong", KEY + "x", KEY[:-1]):
        with make_client(keyed, key) as client, pytest.raises(openai.AuthenticationError) as info:
            client.models.list()
        assert info.value.status_code == 401
        assert isinstance(info.value.body, dict)
        assert info.value.body["type"] == "authentication_error"
        assert info.value.body["code"] == "invalid_api_key"
    with httpx.Client(base_url=keyed.url) as http:
        for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            response = http.post("/v1/chat/completions", json={}, headers=headers)
            assert_openai_error(response, 401, None)
            assert response.headers["www-authenticate"] == "Bearer"
        # auth comes before the body is even parsed
        bad_json = http.post(
            "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 401


def test_right_key_is_served(keyed: Any, base_id: str) -> None:
    with make_client(keyed, KEY) as client:
        assert client.models.list().data[0].id == base_id
        result = client.chat.completions.create(
            model=base_id, messages=chat_messages(HELLO), temperature=0
        )
        assert result.choices[0].message.content == HELLO_ANSWER


def test_probes_and_metrics_stay_open(keyed: Any) -> None:
    with httpx.Client(base_url=keyed.url) as http:
        assert http.get("/health").json()["status"] == "ok"
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert http.get("/metrics").status_code == 200


def test_plain_app_errors_are_openai_shaped(keyed: Any) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, headers=auth) as http:
        assert_openai_error(http.get("/v1/nothing"), 404, None)
        assert_openai_error(http.get("/nothing"), 404, None)
        assert_openai_error(http.delete("/health"), 405, None)
        assert_openai_error(http.get("/v1/completions"), 405, None)


def test_unhandled_error_is_a_logged_500(keyed: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A bug anywhere becomes a 500 in OpenAI's shape naming the request id, and its
    traceback is logged. (The route is added here: no real route fails on purpose.)"""

    async def broken() -> None:
        raise RuntimeError("kaboom")

    keyed.app.add_api_route("/broken", broken)
    with httpx.Client(base_url=keyed.url) as http:
        response = http.get("/broken", headers={"X-Request-Id": "req-500"})
    error = assert_openai_error(response, 500, None)
    assert error["type"] == "internal_error" and "req-500" in error["message"]
    assert response.headers["x-request-id"] == "req-500"
    failure = next(r for r in caplog.records if "req-500" in r.getMessage())
    assert failure.exc_info is not None and "kaboom" in str(failure.exc_info[1])


def test_ready_is_503_once_the_engine_stops(keyed: Any, base_id: str) -> None:
    """Runs last in this module: it stops the module's engine."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, headers=auth) as http:
        assert http.get("/ready").status_code == 200
        keyed.app.state.generation.engine.shutdown()
        response = http.get("/ready")
        assert_openai_error(response, 503, None)
        assert response.json()["error"]["type"] == "service_unavailable_error"
        assert http.get("/health").status_code == 200  # alive all the same
        chat = http.post("/v1/chat/completions", json={"model": base_id, "messages": HELLO})
        assert_openai_error(chat, 503, None)
