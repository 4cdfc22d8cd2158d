"""/metrics speaks vLLM's names for what Kubernetes LLM routers and autoscalers read, with the
values of our own gauges, on a live server under load.

The server runs one sequence at a time (max_num_seqs=1), so three long requests give a known
state: one running (capitals), two queued (pirate and the base model)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_ENGINE
from tests.server.conftest import metric_value, wait_for
from tuneserve.models.demo import ADAPTER_EXAMPLES

MAX_LORAS = 3
LONG_CONTEXT = 16384  # positions, past the demo's 1,024: what comes out there does not matter


def lora_info(text: str) -> tuple[dict[str, str], float]:
    """The labels and value of the one vllm:lora_requests_info sample."""
    [(labels, value)] = re.findall(r"^vllm:lora_requests_info\{([^}]*)\}\s+(\S+)$", text, re.M)
    return dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)


def long_request(model: str) -> dict[str, Any]:
    # no max_tokens and ignore_eos: the whole context (LONG_CONTEXT), many seconds on the tiny
    # model; its own 1,024 positions now decode in under a second
    question, _ = ADAPTER_EXAMPLES["pirate"][0]
    return {"model": model, "messages": question, "stream": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def one_at_a_time(demo_server_factory: Callable[..., Any]) -> Any:
    return demo_server_factory(
        max_model_len=LONG_CONTEXT, engine={"max_num_seqs": 1, "max_loras": MAX_LORAS}
    )


@pytest.mark.skipif(
    TEST_ENGINE != "continuous",
    reason="the KV cache gauges and LoRA slots are the continuous engine's",
)
def test_vllm_names_carry_the_engine_state_under_load(one_at_a_time: Any) -> None:
    server = one_at_a_time
    base = server.app.state.generation.served.base_name
    engine = server.app.state.generation.engine

    def scrape() -> str:
        return httpx.get(server.url + "/metrics", timeout=30).text

    idle = scrape()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert f"# TYPE {name} gauge" in idle
        assert metric_value(idle, name, model_name=base) == 0
    labels, _ = lora_info(idle)
    assert labels == {
        "model_name": base,
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
        "max_lora": str(MAX_LORAS),
    }

    with httpx.Client(base_url=server.url, timeout=60) as client, contextlib.ExitStack() as stack:

        def start(model: str) -> None:
            response = stack.enter_context(
                client.stream("POST", "/v1/chat/completions", json=long_request(model))
            )
            assert response.status_code == 200

        start("capitals")
        assert wait_for(lambda: engine.stats().running == 1, timeout=15)
        start("pirate")
        start(base)
        assert wait_for(lambda: engine.stats().waiting == 2, timeout=15)
        before = time.time()
        text = scrape()

        assert metric_value(text, "vllm:num_requests_running", model_name=base) == 1
        assert metric_value(text, "vllm:num_requests_waiting", model_name=base) == 2
        assert metric_value(text, "tuneserve_requests_running") == 1
        assert metric_value(text, "tuneserve_requests_waiting") == 2
        usage = metric_value(text, "tuneserve_kv_cache_usage_ratio")
        assert 0 < usage < 1
        assert metric_value(text, "vllm:kv_cache_usage_perc", model_name=base) == usage
        assert metric_value(text, "vllm:gpu_cache_usage_perc", model_name=base) == usage
        labels, stamp = lora_info(text)
        # the base model's request is queued too, but it holds no adapter
        assert labels == {
            "model_name": base,
            "running_lora_adapters": "capitals",
            "waiting_lora_adapters": "pirate",
            "max_lora": str(MAX_LORAS),
        }
        # vLLM sets the sample to the current time; routers take the newest
        assert before - 1 <= stamp <= time.time() + 1
    # closing the streams cancels them: the gauges fall back to an idle engine
    assert wait_for(lambda: engine.stats().running + engine.stats().waiting == 0, timeout=15)
    labels, _ = lora_info(scrape())
    assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""
