"""Prometheus metrics: a GenerationObserver that counts, and GET /metrics that exposes them.

Each app owns its CollectorRegistry (tests build many apps in one process; the global
registry would refuse the second set of names). Counts are per engine request, i.e. per
choice: a request with n=3 adds 3 to tuneserve_requests_total. The running/waiting gauges
are read from engine.stats() at scrape time, so they are never stale.

The same scrape also speaks vLLM's names for the signals Kubernetes LLM routers and autoscalers
read (the Gateway API Inference Extension's endpoint picker, vLLM production-stack's router,
KEDA queries written for vLLM), so they take a tuneserve pod for a vLLM one:

    vllm:num_requests_running   = tuneserve_requests_running
    vllm:num_requests_waiting   = tuneserve_requests_waiting
    vllm:kv_cache_usage_perc    = tuneserve_kv_cache_usage_ratio (0..1, as vLLM's)
    vllm:gpu_cache_usage_perc   the same, under vLLM's older name that routers still read
    vllm:lora_requests_info     labels running_lora_adapters, waiting_lora_adapters (comma
                                separated), max_lora; value: the scrape time, as vLLM sets it

each with vLLM's `model_name` label (the base model's served name).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Mapping

from fastapi import APIRouter, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from tuneserve.engine.base import Engine
from tuneserve.engine.types import EngineStats
from tuneserve.server.generation import FinishedRequest

PREFIX = "tuneserve_"
VLLM_PREFIX = "vllm:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class EngineStatsCollector(Collector):
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def describe(self) -> Iterable[Metric]:
        idle = EngineStats(running=0, waiting=0, kv_cache_usage=0.0, max_loras=0)
        return self._families(idle, {}) + vllm_families(idle, self.model_name, now=0.0)

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.stats()
        states = [usage.state for usage in self.engine.adapter_usage().values()]
        own = self._families(stats, collections.Counter(states))
        return own + vllm_families(stats, self.model_name, now=time.time())

    @staticmethod
    def _families(stats: EngineStats, adapters: Mapping[str, int]) -> list[Metric]:
        served = GaugeMetricFamily(
            PREFIX + "adapters",
            "Adapters served, by where their weights are: hot (an engine slot), cpu, disk.",
            labels=["state"],
        )
        for state in ("hot", "cpu", "disk"):
            served.add_metric([state], adapters.get(state, 0))
        families: list[Metric] = [
            GaugeMetricFamily(
                PREFIX + "requests_running",
                "Requests the engine is generating for.",
                stats.running,
            ),
            GaugeMetricFamily(
                PREFIX + "requests_waiting",
                "Requests queued for a place in the batch.",
                stats.waiting,
            ),
            served,
        ]
        if stats.kv_cache_usage is not None:  # engines with a KV budget (continuous)
            families += [
                GaugeMetricFamily(
                    PREFIX + "kv_cache_usage_ratio",
                    "Share of the KV cache budget held by running sequences (0..1).",
                    stats.kv_cache_usage,
                ),
                CounterMetricFamily(
                    PREFIX + "preemptions",
                    "Running sequences preempted for KV space (recomputed later).",
                    stats.preemptions,
                ),
            ]
        return families


def vllm_families(stats: EngineStats, model_name: str, *, now: float) -> list[Metric]:
    """The engine's stats under vLLM's metric names and labels (see the module docstring)."""
    label = ["model_name"]

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(VLLM_PREFIX + name, doc, labels=label)
        family.add_metric([model_name], value)
        return family

    families: list[Metric] = [
        gauge(
            "num_requests_running", "Number of requests in model execution batches.", stats.running
        ),
        gauge("num_requests_waiting", "Number of requests waiting to be processed.", stats.waiting),
    ]
    if stats.kv_cache_usage is not None:
        for name in ("kv_cache_usage_perc", "gpu_cache_usage_perc"):
            families.append(
                gauge(name, "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage)
            )
    if stats.max_loras is None:  # as vLLM without LoRA: no adapter information to give
        return families
    lora = GaugeMetricFamily(
        VLLM_PREFIX + "lora_requests_info",
        "Running stats on lora requests.",
        labels=[*label, "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    running, waiting = ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)
    lora.add_metric([model_name, running, waiting, str(stats.max_loras)], now)
    families.append(lora)
    return families


class PrometheusMetrics:
    """Implements server.generation.GenerationObserver."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "Finished engine requests (one per choice), by finish reason.",
            ["model", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from submitting a request to its first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            PREFIX + "request_latency_seconds",
            "Seconds from submitting a request to its end (finished or cancelled).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(EngineStatsCollector(engine, model_name))

    # -- GenerationObserver ----------------------------------------------------------------
    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def request_finished(self, done: FinishedRequest) -> None:
        # in-flight counts come from the engine itself (requests_running/waiting)
        self.requests.labels(done.model, done.finish_reason).inc()
        self.prompt_tokens.labels(done.model).inc(done.prompt_tokens)
        self.generation_tokens.labels(done.model).inc(done.completion_tokens)
        self.latency.labels(done.model).observe(done.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)")
async def metrics(request: Request) -> Response:
    observer: PrometheusMetrics = request.app.state.metrics
    return Response(observer.render(), media_type=CONTENT_TYPE_LATEST)
