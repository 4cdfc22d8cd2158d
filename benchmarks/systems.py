"""The systems under test that the harness drives over HTTP: how to start each, what to send it.

The ceiling has no server; runner.py runs it directly.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.client import completion_body
from benchmarks.model import BenchModel
from benchmarks.results import BenchConfig

REPO = Path(__file__).resolve().parent.parent
CB_PAGE_SIZE = 256  # transformers' ContinuousBatchingConfig.page_size default


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    ready_path: str  # GET this until 200
    env: dict[str, str]


class HttpSystem:
    name: str = ""
    description: str = ""

    def unsupported(self, k: int) -> str | None:
        """Why this system cannot run with K adapters (None: it can)."""
        return None

    def launch(self, bench: BenchModel, k: int, cfg: BenchConfig, port: int) -> Launch:
        raise NotImplementedError

    def body(self, prompt: str, adapter: str, cfg: BenchConfig, max_tokens: int) -> dict[str, Any]:
        return completion_body(adapter, prompt, max_tokens)


def _adapter_flags(bench: BenchModel, k: int) -> list[str]:
    flags = []
    for name in bench.adapter_names(k):
        flags += ["--adapter", f"{name}={bench.adapters[name]}"]
    return flags


class Tuneserve(HttpSystem):
    def __init__(self, name: str, engine: str | None) -> None:
        self.name, self.engine = name, engine
        self.description = (f"tuneserve serve --engine {engine}" if engine
                            else "tuneserve serve (its default engine)")

    def unsupported(self, k: int) -> str | None:
        if self.engine and not tuneserve_has_engine_flag():
            return (f"`tuneserve serve` has no --engine flag yet, so engine {self.engine!r} "
                    "cannot be chosen")
        return None

    def launch(self, bench: BenchModel, k: int, cfg: BenchConfig, port: int) -> Launch:
        argv = [sys.executable, "-m", "tuneserve", "serve", "--base", str(bench.base),
                *_adapter_flags(bench, k), "--host", "127.0.0.1", "--port", str(port),
                "--max-batch-size", str(max(cfg.concurrency)), "--dtype", "float32",
                "--device", "cpu", "--no-ui", "--log-level", "warning"]
        if self.engine:
            argv += ["--engine", self.engine]
        if self.engine in (None, "continuous"):
            # Every adapter of the point hot: what a user serving K adapters would set.
            argv += ["--max-loras", str(max(8, k))]
        return Launch(argv, "/ready", {"GRADIO_ANALYTICS_ENABLED": "False"})


@cache
def tuneserve_has_engine_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "tuneserve", "serve", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    return "--engine" in out.stdout


class Peer(HttpSystem):
    """seed-way and peft-batch: our small FastAPI servers in benchmarks/peers/."""

    def __init__(self, name: str, module: str, description: str) -> None:
        self.name, self.module, self.description = name, module, description

    def launch(self, bench: BenchModel, k: int, cfg: BenchConfig, port: int) -> Launch:
        argv = [sys.executable, "-m", self.module, "--base", str(bench.base),
                *_adapter_flags(bench, k), "--port", str(port),
                "--max-batch-size", str(max(cfg.concurrency))]
        return Launch(argv, "/health", {"PYTHONPATH": str(REPO)})


class TransformersServeCB(HttpSystem):
    name = "tf-serve-cb"
    description = ("transformers serve --continuous-batching on the base with adapter a0 merged "
                   "(K=1 only; EOS removed from the merged model's config: it has no ignore_eos)")

    def unsupported(self, k: int) -> str | None:
        if k != 1:
            return "transformers serve cannot serve LoRA adapters: it runs a0 merged, K=1 only"
        if transformers_cli() is None:
            return "the `transformers` command is not installed next to this Python"
        return None

    def launch(self, bench: BenchModel, k: int, cfg: BenchConfig, port: int) -> Launch:
        # On CPU, transformers sizes its paged KV cache from free RAM (GBs even for a tiny
        # model); give it what the workload needs plus one spare page per sequence.
        seqs = max(cfg.concurrency)
        pages = seqs * (math.ceil((cfg.prompt_len + cfg.max_tokens) / CB_PAGE_SIZE) + 1)
        argv = [str(transformers_cli()), "serve", str(bench.merged), "--continuous-batching",
                "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                "--dtype", "float32", "--log-level", "warning", "--cb-num-blocks", str(pages)]
        return Launch(argv, "/health", {})

    def body(self, prompt: str, adapter: str, cfg: BenchConfig, max_tokens: int) -> dict[str, Any]:
        # Its request schema rejects unknown fields (ignore_eos); "model" may be left out.
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def transformers_cli() -> Path | None:
    beside = Path(sys.executable).parent / "transformers"
    if beside.exists():
        return beside
    found = shutil.which("transformers")
    return Path(found) if found else None


def http_system(name: str, cfg: BenchConfig) -> HttpSystem:
    if name == "tuneserve":
        return Tuneserve(name, cfg.tuneserve_engine)
    if name == "tuneserve-simple":
        return Tuneserve(name, "simple")
    if name == "seed-way":
        return Peer(name, "benchmarks.peers.seed_way",
                    "one PEFT model, one request at a time via TextIteratorStreamer in a thread "
                    "(the AI Toolkit template's way); set_adapter per request")
    if name == "peft-batch":
        return Peer(name, "benchmarks.peers.peft_batch",
                    "PEFT mixed-adapter static batching: generate(adapter_names=...) over "
                    "whatever is waiting, up to the max batch size")
    if name == "tf-serve-cb":
        return TransformersServeCB()
    raise ValueError(f"unknown system {name!r}")
