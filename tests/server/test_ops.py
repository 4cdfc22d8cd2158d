"""/health, /ready and /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import chat_messages, metric_value
from tuneserve.models.demo import ADAPTER_EXAMPLES

CAPITAL, CAPITAL_ANSWER = ADAPTER_EXAMPLES["capitals"][0]


def test_health(http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    monkeypatch.setenv("TUNESERVE_REVISION", "rev-42")
    assert http.get("/health").json() == {"status": "ok", "revision": "rev-42"}


def test_ready_lists_the_models(http: httpx.Client, base_id: str) -> None:
    response = http.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "models": [base_id, "capitals", "pirate"]}


def test_metrics_count_requests_and_tokens(http: httpx.Client, client: openai.OpenAI) -> None:
    def scrape() -> str:
        response = http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    result = client.chat.completions.create(
        model="capitals", messages=chat_messages(CAPITAL), temperature=0, n=2
    )
    assert result.choices[0].message.content == CAPITAL_ANSWER
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("tuneserve_requests_total", model="capitals", finish_reason="stop") == 2
    assert result.usage is not None
    assert (
        delta("tuneserve_prompt_tokens_total", model="capitals") == 2 * result.usage.prompt_tokens
    )
    assert (
        delta("tuneserve_generation_tokens_total", model="capitals")
        == result.usage.completion_tokens
    )
    assert delta("tuneserve_time_to_first_token_seconds_count", model="capitals") == 2
    assert delta("tuneserve_request_latency_seconds_count", model="capitals") == 2
    assert metric_value(after, "tuneserve_requests_running") == 0
    assert metric_value(after, "tuneserve_requests_waiting") == 0
    assert "# TYPE tuneserve_requests_running gauge" in after
    # the continuous engine's KV budget: nothing held once idle, no preemption at this load
    assert metric_value(after, "tuneserve_kv_cache_usage_ratio") == 0
    assert metric_value(after, "tuneserve_preemptions_total") == 0
