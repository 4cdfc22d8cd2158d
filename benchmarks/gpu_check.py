"""GPU check kit: one command and a JSON summary for a lent GPU machine (`scripts/gpu-check`).

What it does, each part under its own deadline (a part that fails or runs out of time is recorded
and the next one still runs; the whole run stays inside `--budget`, 420 s by default):

1. tests    the CUDA-parametrised correctness tests (tests/engine/test_continuous.py, `-k cuda`:
            float32, bfloat16 and float16, two model families) in a pytest subprocess; passed /
            failed / skipped counts per dtype, and each failure's message.
2. model    a model of SmolLM2-135M-Instruct's shape (Llama: hidden 576, intermediate 1536, 30
            layers, 9 heads / 3 KV heads, head_dim 64, vocab 49152, tied embeddings, rope_theta
            1e5) with seeded RANDOM weights, built on the machine (the real weights, a 94 MB GGUF,
            do not travel; speed depends on the shape, not the values), and adapters a0..a7 built
            the way benchmarks/model.py builds the bench model's (LoRA r=16, alpha 32 on q/k/v/o,
            A and B random). Prompts are token ids (benchmarks/model.py `prompt_ids`): no tokenizer
            download. Then
            - throughput (benchmarks/engine_micro.py's measurements): the ContinuousBatchingEngine
              in bf16 at C = 1, 8, 32 with no adapters ("engine") and with 8 (request i on adapter
              i % 8, "engine-lora"), and HF's DynamicCache greedy loop ("hf", the ceiling); 128-
              token prompts, 128 new tokens, ignore_eos, greedy; decode tok/s, total tok/s, time to
              first token (engine), peak GPU memory (torch.cuda.max_memory_allocated) per system,
              and the KV cache the engine chose (blocks, block size, bytes) under
              `--kv-cache-memory` (4 GiB: the default would take 0.9 of the card);
            - agreement: 9 requests of ragged lengths in one mixed batch through the engine (one
              on the base, one on each adapter), each compared with transformers + PEFT
              `generate(do_sample=False)` on its own, in bf16, fp32 and fp16.

The agreement rule (the tests' `assert_greedy_matches`, and `greedy_agreement` here):
  - float32: the engine's greedy tokens must equal the reference's, token for token;
  - bfloat16 / float16: equal, except that at the FIRST position where they differ the engine's
    token is accepted if the reference scores it within a tolerance of its best token (a near-tie
    that rounding decides); nothing after that position is compared (the two continue from
    different prefixes). The tolerance: 0.03 in the tests' tiny models; here `--tolerance`, 0.1:
    the random 30-layer model's logits are ~N(0, 0.5) over 49152 tokens, so its top two are
    often within 0.05, bf16 resolves a logit near 2 only to 2**-6 = 0.016, and the engine's and
    HF's kernels round differently over 30 layers; a wrong adapter, position or cache entry
    moves logits by ~1 or more.
  The JSON records, per request, "exact", "near-tie" (with the position and the gap) or
  "diverged"; a float32 divergence is recorded with its gap as well, so a tie at the level of
  summation order (gap ~1e-6, noted as such) can be told from a bug.

Output: a JSON file (`--out`; default `$OUT/gpu-check.json` when OUT is set, else
./gpu-check.json) with the machine (GPU, driver, torch/CUDA, library versions), each part's
results, and a short markdown table on stdout; beside the JSON, gpu-check-tests.log (pytest's
output) and gpu-check-model.log (the model part's output). Exit status 0 when every part passed.

On a lent GPU machine (no network there; the wheels it lacks travel in .whl/, made here once by
scripts/gpu-wheels), the `run` call is:

    command:   scripts/gpu-check
    carry:     [".whl"]
    timeout_s: 510

Here, to test the logic without a GPU (tiny model, small sizes, one thread):

    scripts/gpu-check --device cpu --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.model import (
    SEED,
    SIZES,
    BenchModel,
    ModelSize,
    _build_adapter,
    _once,
    adapter_name,
    prompt_ids,
)
from benchmarks.model import _build_base as build_base
from benchmarks.results import _git

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
TEST_FILE = "tests/engine/test_continuous.py"
GiB = 2**30

# The model's shapes: SmolLM2-135M-Instruct's (benchmarks/model.py's "smollm2" sizes, plus what
# its config.json adds), and a tiny one to test this kit on a CPU.
SHAPES: dict[str, ModelSize] = {"smollm2": SIZES["smollm2"], "tiny": SIZES["tiny"]}
SHAPE_NOTES = {
    "smollm2": "SmolLM2-135M-Instruct's shape (LlamaConfig as its config.json) with seeded random "
    "weights: speed is the real model's; agreement is checked on it too",
    "tiny": "a tiny Llama with random weights (for testing this kit; numbers mean nothing)",
}
ROPE_THETA = 100000.0
DTYPES = ("float32", "bfloat16", "float16")
HALF_TOLERANCE = 0.1
FLOAT32_TIE = 1e-4  # a float32 gap this small is summation order, not a bug


@dataclass
class Plan:
    """Everything one run does; the worker subprocess gets it as JSON."""

    device: str
    shape: str
    dtype: str
    batches: list[int]
    prompt_len: int
    new_tokens: int
    adapters: int
    rounds: int
    agree_dtypes: list[str]
    agree_requests: int
    agree_tokens: int
    tolerance: float
    kv_cache_memory: int
    cache: str
    threads: int | None
    tests_k: str
    pytest_args: list[str]
    sections: list[str]
    budget_s: float
    quick: bool
    deadline: float = 0.0  # time.time() by which the worker stops (set per part)
    part_out: str = ""  # where the worker writes its results as it goes


def build_plan(argv: Sequence[str] | None = None) -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="the model's shape (default: smollm2 on cuda, tiny on cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="throughput dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--batches", default=None, help="C values, comma-separated (1,8,32)")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--adapters", type=int, default=None, help="adapters served (8)")
    parser.add_argument("--rounds", type=int, default=None, help="repeats per point; median kept")
    parser.add_argument("--agree-dtypes", default=None,
                        help="dtypes of the agreement check (bfloat16,float32,float16 on cuda)")
    parser.add_argument("--agree-requests", type=int, default=None)
    parser.add_argument("--agree-tokens", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=HALF_TOLERANCE,
                        help="half precision near-tie tolerance (logit gap) for the agreement")
    parser.add_argument("--kv-cache-memory", type=float, default=4.0,
                        help="the engine's KV cache budget in GiB")
    parser.add_argument("--tests-k", default=None,
                        help=f"pytest -k selection in {TEST_FILE} (default: cuda, or cpu ones)")
    parser.add_argument("--pytest-arg", action="append", default=[], dest="pytest_args",
                        help="one more pytest argument (repeatable), e.g. --pytest-arg=-x")
    parser.add_argument("--sections", default="tests,model", help="parts to run: tests,model")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (420 on cuda, 300 on cpu)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "tuneserve-gpu-check",
                        help="where the model and adapters are built (reused)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on cpu, torch's choice on cuda)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON summary's path")
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    quick = args.quick

    def pick(value: Any, quick_value: Any, full_value: Any) -> Any:
        return value if value is not None else (quick_value if quick else full_value)

    default_agree = "bfloat16" if quick else "bfloat16,float32,float16"
    if args.tests_k is not None:
        tests_k = args.tests_k
    elif cuda:
        tests_k = "cuda"
    else:
        tests_k = "mixed_batch and llama-cpu-float32" if quick else "mixed_batch and cpu"
    plan = Plan(
        device=args.device,
        shape=args.shape or ("smollm2" if cuda else "tiny"),
        dtype=args.dtype or ("bfloat16" if cuda else "float32"),
        batches=[int(b) for b in pick(args.batches, "1,4", "1,8,32").split(",")],
        prompt_len=pick(args.prompt_len, 16, 128),
        new_tokens=pick(args.new_tokens, 16, 128),
        adapters=pick(args.adapters, 2, 8),
        rounds=pick(args.rounds, 1, 2 if cuda else 1),
        agree_dtypes=(args.agree_dtypes or (default_agree if cuda else "float32")).split(","),
        agree_requests=pick(args.agree_requests, 3, 9),
        agree_tokens=pick(args.agree_tokens, 8, 64),
        tolerance=args.tolerance,
        kv_cache_memory=int(args.kv_cache_memory * GiB),
        cache=str(args.cache),
        threads=args.threads if args.threads is not None else (None if cuda else 1),
        tests_k=tests_k,
        pytest_args=list(args.pytest_args),
        sections=[s for s in args.sections.split(",") if s],
        budget_s=args.budget if args.budget is not None else (420.0 if cuda else 300.0),
        quick=quick,
    )
    for name in plan.agree_dtypes:
        if name not in DTYPES:
            parser.error(f"--agree-dtypes: {name!r} is not one of {', '.join(DTYPES)}")
    unknown = set(plan.sections) - {"tests", "model"}
    if unknown:
        parser.error(f"--sections: {', '.join(sorted(unknown))} unknown; parts are tests,model")
    if plan.adapters < 1:
        parser.error("--adapters: at least 1")
    out = args.out
    if out is None:
        out = Path(os.environ["OUT"]) / "gpu-check.json" if os.environ.get("OUT") else Path(
            "gpu-check.json"
        )
    return plan, out


# -- small helpers -----------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: None instead, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2))
    os.replace(tmp, path)


def _versions(names: Sequence[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        done = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _machine() -> dict[str, Any]:
    """What the parent knows without importing torch (the worker adds torch's view)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "nvidia_smi": _nvidia_smi(),
        "git": _git(),  # the commit and whether the tree was dirty
        "packages": _versions(["torch", "transformers", "peft", "pydantic", "safetensors",
                               "tokenizers", "huggingface_hub", "accelerate"]),
    }


# -- part 1: the CUDA-parametrised tests -----------------------------------------------------
def _dtype_of(test_name: str) -> str:
    """The dtype in a test id like `name[llama-cuda-bfloat16]` ("other" without one)."""
    if "[" in test_name:
        params = test_name[test_name.index("[") + 1 : test_name.rindex("]")].split("-")
        for dtype in DTYPES:
            if dtype in params:
                return dtype
    return "other"


def parse_junit(path: Path) -> dict[str, Any]:
    """Per-dtype counts and the failures of a pytest --junitxml file."""
    by_dtype: dict[str, dict[str, int]] = {}
    failures: list[dict[str, str]] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                if child.tag != "skipped":
                    message = (child.get("message") or "") + "\n" + (child.text or "")
                    failures.append({"test": name, "outcome": outcome,
                                     "message": message.strip()[-1500:]})
                break
        counts = by_dtype.setdefault(_dtype_of(name),
                                     {"passed": 0, "failed": 0, "skipped": 0, "errors": 0})
        counts[outcome] += 1
    return {"by_dtype": by_dtype, "failures": failures}


def parse_log(path: Path) -> dict[str, Any]:
    """Per-dtype counts from `pytest -v` lines (`path::name[id] PASSED`), for a run cut short."""
    outcomes = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}
    by_dtype: dict[str, dict[str, int]] = {}
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in outcomes:
            counts = by_dtype.setdefault(_dtype_of(parts[0].split("::")[-1]),
                                         {"passed": 0, "failed": 0, "skipped": 0, "errors": 0})
            counts[outcomes[parts[1]]] += 1
    return {"by_dtype": by_dtype, "failures": []}


def run_tests(plan: Plan, out_dir: Path, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"selection": f"{TEST_FILE} -k {plan.tests_k!r}", "ok": False}
    if timeout < 20:
        result["error"] = "skipped: no time left in the budget"
        return result
    work = Path(tempfile.mkdtemp(prefix="gpu-check-tests-"))
    junit = work / "junit.xml"
    log = out_dir / "gpu-check-tests.log"
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-k", plan.tests_k, "-v",
           "-p", "no:cacheprovider", f"--junitxml={junit}", f"--basetemp={work / 'tmp'}",
           *plan.pytest_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    start = time.monotonic()
    try:
        with log.open("w") as handle:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                result["returncode"] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                result["error"] = f"timed out after {timeout:.0f} s (its log: {log.name})"
        result["wall_s"] = round(time.monotonic() - start, 1)
        if junit.exists():
            result.update(parse_junit(junit))
        else:  # killed before pytest wrote it: what its log says so far
            result.update(parse_log(log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = result.get("by_dtype", {}).values()
    passed = sum(c["passed"] for c in counts)
    bad = sum(c["failed"] + c["errors"] for c in counts)
    result["passed"], result["failed"] = passed, bad
    result["skipped"] = sum(c["skipped"] for c in counts)
    if passed == 0 and "error" not in result:
        result["error"] = "no test passed" + (" (all skipped: no CUDA device?)"
                                              if result["skipped"] else "")
    result["ok"] = "error" not in result and result.get("returncode") == 0 and passed > 0
    if result.get("returncode") not in (None, 0, 1) and "error" not in result:
        result["error"] = f"pytest exited {result['returncode']} (its log: {log.name})"
    result["log"] = log.name
    return result


def _kill(proc: subprocess.Popen[Any]) -> None:
    """End a subprocess we started, and its children (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    proc.wait()


# -- part 2: the model (runs in a worker subprocess) -------------------------------------------
@dataclass(frozen=True)
class ShapeModel(BenchModel):
    """A BenchModel (what benchmarks/engine_micro.py takes) of a shape outside SIZES' naming:
    random prompt ids over its own vocabulary."""

    vocab_size: int = 0

    @property
    def vocab(self) -> int:
        return self.vocab_size

    @property
    def real(self) -> bool:
        return False

    def prompt_ids(self, index: int, length: int, seed: int = SEED) -> list[int]:
        return prompt_ids(index, length, self.vocab_size, seed)


def _build_base(dest: Path, spec: ModelSize) -> None:
    """benchmarks/model.py's base with SmolLM2's config details (tied embeddings, head_dim,
    rope_theta, context)."""
    build_base(
        dest,
        spec,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
    )


def ensure_shape_model(cache: Path, shape: str, adapters: int) -> ShapeModel:
    """Build (or reuse) the base and adapters a0..a{adapters-1} (benchmarks/model.py's builders
    and its build-then-rename `_once`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = SHAPES[shape]
    root = cache / f"{shape}-v1"
    base = root / "base"
    _once(base, lambda tmp: _build_base(tmp, spec))
    names = [adapter_name(i) for i in range(adapters)]
    for i, name in enumerate(names):
        _once(root / "adapters" / name, lambda tmp, i=i: _build_adapter(tmp, base, spec, i))
    return ShapeModel(
        size=shape,
        root=root,
        base=base,
        merged=root / "merged",  # not built: nothing here runs `transformers serve`
        adapters={name: root / "adapters" / name for name in names},
        vocab_size=spec.vocab,
    )


@dataclass
class Worker:
    """The model part: results written to `plan.part_out` after every step, so a run killed at
    its deadline still leaves what it measured."""

    plan: Plan
    result: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        _write_json(Path(self.plan.part_out), self.result)

    def left(self) -> float:
        return self.plan.deadline - time.time()

    # -- torch state ---------------------------------------------------------------------
    @property
    def cuda(self) -> bool:
        return self.plan.device == "cuda"

    def reset_peak(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> dict[str, Any]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                    "memory_kind": "torch.cuda.max_memory_allocated"}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_memory_bytes": rss, "memory_kind": "process max RSS (CPU)"}

    def torch_machine(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {
            "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "threads": torch.get_num_threads(),
        }
        if self.cuda and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info()
            info.update(
                gpu_name=props.name,
                capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count,
                gpu_memory_total_bytes=total,
                gpu_memory_free_bytes=free,
                cudnn=torch.backends.cudnn.version(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            )
        return info

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> None:
        import torch

        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        plan = self.plan
        if plan.threads:
            torch.set_num_threads(plan.threads)
        self.result.update(
            shape=plan.shape,
            note=SHAPE_NOTES[plan.shape],
            config={k: v for k, v in asdict(SHAPES[plan.shape]).items() if k != "real"}
            | {"head_dim": SHAPES[plan.shape].hidden // SHAPES[plan.shape].heads,
               "rope_theta": ROPE_THETA, "tie_word_embeddings": True},
            machine=self.torch_machine(),
            throughput=[],
            systems={},
            agreement={},
            errors=[],
        )
        self.save()
        if self.cuda and not torch.cuda.is_available():
            self.result["errors"].append("--device cuda but torch sees no CUDA device")
            self.save()
            return
        start = time.monotonic()
        bench = self._guarded("building the model", ensure_shape_model, Path(plan.cache),
                              plan.shape, plan.adapters)
        if bench is None:
            return
        self.result["build_s"] = round(time.monotonic() - start, 1)
        self.result["parameters"] = _count_parameters(bench)
        self.save()
        # throughput first, within ~60% of what is left; the agreement checks get the rest
        throughput_deadline = time.time() + 0.6 * self.left()
        self.throughput(bench, throughput_deadline)
        self.agreement(bench)
        self.result["ok"] = not self.result["errors"] and all(
            a.get("ok") for a in self.result["agreement"].values()
        ) and bool(self.result["throughput"])

    def _guarded(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one step; an exception is recorded (with its last line of traceback), not fatal."""
        try:
            return fn(*args)
        except Exception as exc:  # a failing step must not end the run
            import traceback

            tb = traceback.format_exc(limit=4)
            self.result["errors"].append(f"{what}: {type(exc).__name__}: {exc}\n{tb[-1500:]}")
            print(f"[gpu-check] {what} failed:\n{tb}", file=sys.stderr, flush=True)
            self.save()
            return None

    # -- throughput ------------------------------------------------------------------------
    def throughput(self, bench: ShapeModel, deadline: float) -> None:
        systems = [("hf", 0), ("engine", 0), ("engine-lora", self.plan.adapters)]
        for system, adapters in systems:
            if time.time() > deadline:
                self.result["systems"][system] = {"skipped": "deadline"}
                self.save()
                continue
            self._guarded(f"throughput {system}", self._system, bench, system, adapters, deadline)
            self.reset_peak()

    def _system(self, bench: ShapeModel, system: str, adapters: int, deadline: float) -> None:
        import torch

        plan = self.plan
        self.reset_peak()
        info: dict[str, Any] = {"dtype": plan.dtype, "adapters": adapters}
        self.result["systems"][system] = info
        names = bench.adapter_names(adapters) if system != "hf" else []
        engine = None
        try:
            if system != "hf":
                engine = self._engine(bench, adapters, getattr(torch, plan.dtype),
                                      max(plan.batches), plan.prompt_len + plan.new_tokens + 8)
                info["weights_bytes"] = _weights_bytes(engine.model)
                info["kv_cache"] = _kv_cache(engine, plan.kv_cache_memory)
                info["kv_cache_default_budget"] = self._guarded(
                    "the default KV budget", _default_kv_budget, engine
                )
            self._measure(bench, system, info, engine, names, deadline)
        finally:
            if engine is not None:
                engine.shutdown()
        info.update(self.peak_memory())
        self.save()

    def _measure(
        self, bench: ShapeModel, system: str, info: dict[str, Any], engine: Any,
        names: list[str], deadline: float,
    ) -> None:
        """Warm up, then every C for `plan.rounds` rounds: the engine's points
        (engine_micro's `_engine_point`) or HF's DynamicCache loop (`hf_decode_tok_s`)."""
        import torch

        from benchmarks import engine_micro

        plan = self.plan
        hf_model = None
        if engine is None:
            from transformers import AutoModelForCausalLM

            model: Any = AutoModelForCausalLM.from_pretrained(
                bench.base, dtype=getattr(torch, plan.dtype)
            )
            hf_model = model.to(plan.device).eval()
            info["weights_bytes"] = _weights_bytes(hf_model)
            with torch.device(plan.device):  # engine_micro's loop builds its ids on the default
                engine_micro.hf_decode_tok_s(hf_model, bench, 1, plan.prompt_len, 4)  # warm-up
        else:
            engine_micro.engine_point(engine, bench, 2, plan.prompt_len, 4, names)  # warm-up
        self.save()
        samples: dict[int, list[dict[str, float]]] = {}
        for round_ in range(plan.rounds):
            for batch in plan.batches:
                if time.time() > deadline:
                    info.setdefault("skipped", []).append(f"C={batch} round {round_ + 1}")
                    continue
                if hf_model is not None:
                    with torch.device(plan.device):
                        rate = engine_micro.hf_decode_tok_s(
                            hf_model, bench, batch, plan.prompt_len, plan.new_tokens
                        )
                    point = {"decode_tok_s": rate}
                else:
                    point = self._engine_point(engine, bench, batch, names)
                samples.setdefault(batch, []).append(point)
                self._record(system, len(names), samples)
                info.update(self.peak_memory())
                self.save()

    def _engine(
        self, bench: ShapeModel, adapters: int, dtype: Any, max_num_seqs: int, max_model_len: int
    ) -> Any:
        from benchmarks.engine_micro import served_model
        from tuneserve.engine.continuous import ContinuousBatchingEngine

        served = served_model(bench, adapters)
        served.model.to(self.plan.device, dtype)
        served.device, served.dtype = self.plan.device, str(dtype).removeprefix("torch.")
        engine = ContinuousBatchingEngine(
            served,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            max_loras=max(adapters, 1),
            kv_cache_memory=self.plan.kv_cache_memory,
        )
        if engine.loras is not None:  # every adapter in its slot before timing
            for name in bench.adapter_names(adapters):
                slot = engine.loras.acquire(name)
                assert slot is not None, f"no slot for adapter {name}"
                engine.loras.release(slot)
        engine.start()
        return engine

    def _engine_point(
        self, engine: Any, bench: ShapeModel, batch: int, names: list[str]
    ) -> dict[str, float]:
        from benchmarks import engine_micro

        plan = self.plan
        point = engine_micro._engine_point(
            engine, bench, batch, plan.prompt_len, plan.new_tokens, names
        )
        timeout = max(self.left(), 1.0)
        result: dict[str, float] = asyncio.run(asyncio.wait_for(point, timeout))
        return result

    def _record(
        self, system: str, adapters: int, samples: dict[int, list[dict[str, float]]]
    ) -> None:
        rows = [r for r in self.result["throughput"] if r["system"] != system]
        for batch, points in samples.items():
            row: dict[str, Any] = {"system": system, "adapters": adapters, "batch": batch,
                                   "dtype": self.plan.dtype}
            for key in points[0]:
                row[key] = statistics.median(p[key] for p in points)
            row["decode_tok_s_all"] = [round(p["decode_tok_s"], 1) for p in points]
            rows.append(row)
        self.result["throughput"] = rows

    # -- agreement -------------------------------------------------------------------------
    def agreement(self, bench: ShapeModel) -> None:
        for dtype_name in self.plan.agree_dtypes:
            if self.left() < 10:
                self.result["agreement"][dtype_name] = {"ok": False, "skipped": "deadline"}
                self.save()
                continue
            self.result["agreement"][dtype_name] = {"ok": False}
            done = self._guarded(f"agreement {dtype_name}", self._agree, bench, dtype_name)
            if done is None:
                self.result["agreement"][dtype_name]["error"] = "failed (see errors)"
            self.reset_peak()
            self.save()

    def _agree(self, bench: ShapeModel, dtype_name: str) -> bool:
        import torch

        plan = self.plan
        dtype = getattr(torch, dtype_name)
        tolerance = 0.0 if dtype_name == "float32" else plan.tolerance
        names = bench.adapter_names(plan.adapters)
        n = plan.agree_requests
        # request 0 on the base, request i on adapter (i - 1) % K; ragged prompt lengths
        adapters: list[str | None] = [None] + [names[(i - 1) % len(names)] for i in range(1, n)]
        lengths = [max(2, plan.prompt_len - (i * 37) % max(plan.prompt_len // 2, 1))
                   for i in range(n)]
        prompts = [bench.prompt_ids(1000 + i, lengths[i]) for i in range(n)]
        info = self.result["agreement"][dtype_name]
        info.update(rule="exact" if tolerance == 0 else f"near-tie at first divergence <= "
                    f"{tolerance}", requests=n, new_tokens=plan.agree_tokens)
        engine = self._engine(bench, len(names), dtype, n, plan.prompt_len + plan.agree_tokens + 8)
        try:
            got = asyncio.run(asyncio.wait_for(
                _collect_tokens(engine, prompts, adapters, plan.agree_tokens),
                max(self.left(), 1.0),
            ))
        finally:
            engine.shutdown()
        del engine
        self.reset_peak()
        reference = _reference_model(bench, names, plan.device, dtype)
        checks: list[dict[str, Any]] = []
        for i, (ids, adapter, tokens) in enumerate(zip(prompts, adapters, got, strict=True)):
            if self.left() < 3:
                checks.append({"request": i, "verdict": "skipped: deadline"})
                continue
            with _adapter(reference, adapter):
                check = greedy_agreement(tokens, reference, ids, tolerance)
            checks.append({"request": i, "adapter": adapter, "prompt_len": len(ids), **check})
            info["checks"] = checks
            self.save()
        # the check has teeth: an adapter changes the output (else a LoRA path that does
        # nothing, in the engine and the reference alike, would pass)
        first = next((i for i, a in enumerate(adapters) if a is not None), None)
        if first is not None and self.left() > 3:
            with _adapter(reference, None):
                base = greedy_agreement(got[first], reference, prompts[first], 0.0)
            info["adapter_changes_output"] = base["verdict"] != "exact"
        verdicts = [c["verdict"] for c in checks]
        info.update(
            checks=checks,
            exact=verdicts.count("exact"),
            near_tie=verdicts.count("near-tie"),
            diverged=verdicts.count("diverged") + verdicts.count("short"),
            max_gap=max((float(c.get("gap", 0.0)) for c in checks), default=0.0),
            ok=all(v in ("exact", "near-tie") for v in verdicts)
            and info.get("adapter_changes_output") is not False,
        )
        del reference
        return True


async def _collect_tokens(
    engine: Any, prompts: list[list[int]], adapters: list[str | None], new_tokens: int
) -> list[list[int]]:
    from tuneserve.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        request = GenerationRequest(f"agree-{i}", tuple(prompts[i]), params, adapters[i])
        async for delta in engine.submit(request):
            tokens.extend(delta.token_ids)
        return tokens

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def _reference_model(bench: ShapeModel, names: list[str], device: str, dtype: Any) -> Any:
    """transformers + PEFT with every adapter loaded (LoRA kept in the model's dtype, as the
    engine computes it); generation never stops at EOS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(bench.base, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    peft = PeftModel.from_pretrained(model, str(bench.adapters[names[0]]), adapter_name=names[0],
                                     autocast_adapter_dtype=False)
    for name in names[1:]:
        peft.load_adapter(str(bench.adapters[name]), adapter_name=name,
                          autocast_adapter_dtype=False)
    return peft.eval()


@contextlib.contextmanager
def _adapter(peft: Any, name: str | None) -> Iterator[None]:
    if name is None:
        with peft.disable_adapter():
            yield
    else:
        peft.set_adapter(name)
        yield


def greedy_agreement(
    got: Sequence[int], model: Any, prompt: Sequence[int], tolerance: float
) -> dict[str, Any]:
    """The agreement rule (the module docstring; tests/engine/test_continuous.py
    `assert_greedy_matches` asserts the same): "exact", "near-tie" or "diverged"."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max(len(got), 1),
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, len(prompt):].tolist()
    if list(got) == expected:
        return {"verdict": "exact", "tokens": len(got)}
    i = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if i is None:  # one is a prefix of the other: the engine stopped early
        return {"verdict": "short", "tokens": len(got), "expected_tokens": len(expected)}
    scores = out.scores[i][0].float()
    gap = float(scores.max() - scores[got[i]])
    verdict = "near-tie" if tolerance > 0 and gap <= tolerance else "diverged"
    check = {"verdict": verdict, "tokens": len(got), "first_divergence": i, "gap": gap,
             "engine_token": got[i], "reference_token": expected[i]}
    if verdict == "diverged" and gap <= FLOAT32_TIE:
        check["note"] = f"a tie within {FLOAT32_TIE}: summation order, most likely not a bug"
    return check


def _weights_bytes(model: Any) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def _count_parameters(bench: ShapeModel) -> int:
    from safetensors import safe_open

    total = 0
    for file in bench.base.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                n = 1
                for dim in handle.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
    return total


def _kv_cache(engine: Any, budget: int) -> dict[str, Any]:
    cache = engine.cache
    return {
        "num_blocks": cache.num_blocks,
        "block_size": cache.block_size,
        "tokens": cache.num_blocks * cache.block_size,
        "nbytes": cache.nbytes,
        "kv_cache_memory": budget,
        "max_num_seqs": engine.max_num_seqs,
        "max_model_len": engine.max_model_len,
    }


def _default_kv_budget(engine: Any) -> dict[str, Any]:
    """The KV cache the engine would choose without --kv-cache-memory (on CUDA: 0.9 of the
    device, less what is in use), for sequences of this engine's max_model_len, uncapped by
    max_num_seqs. Computed only: nothing is allocated."""
    from tuneserve.engine.kv_cache import KVCacheShape, kv_cache_budget

    dtype = engine.cache.keys[0].dtype
    shape = kv_cache_budget(
        KVCacheShape.from_config(engine.model.config, num_blocks=0),
        dtype,
        engine.device,
        max_num_seqs=10**9,
        max_model_len=engine.max_model_len,
    )
    return {"num_blocks": shape.num_blocks - 1, "tokens": shape.num_tokens,
            "nbytes": (shape.num_blocks - 1) * shape.bytes_per_block(dtype)}


def run_model(plan: Plan, out_dir: Path, timeout: float) -> dict[str, Any]:
    """The model part in a worker subprocess, killed at its deadline; its partial results kept."""
    if timeout < 30:
        return {"ok": False, "error": "skipped: no time left in the budget"}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-model-"))
    part = work / "part.json"
    config = work / "plan.json"
    grace = 15.0  # the worker stops itself by its deadline; the kill is for a hang
    worker_plan = Plan(**{**asdict(plan), "deadline": time.time() + timeout - grace,
                          "part_out": str(part)})
    config.write_text(json.dumps(asdict(worker_plan)))
    log = out_dir / "gpu-check-model.log"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", str(config)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    start = time.monotonic()
    error = None
    try:
        with log.open("w") as handle:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                returncode = None
                error = f"killed at its deadline ({timeout:.0f} s); partial results kept"
        result: dict[str, Any] = json.loads(part.read_text()) if part.exists() else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - start, 1)
    result["returncode"] = returncode
    result["log"] = log.name
    if error is None and returncode != 0:
        error = f"the worker exited {returncode} (its log: {log.name})"
    if error is not None:
        result["error"] = error
        result["ok"] = False
    result.setdefault("ok", False)
    return result


def worker_main(config: Path) -> int:
    plan = Plan(**json.loads(config.read_text()))
    worker = Worker(plan)
    try:
        worker.run()
    finally:
        worker.save()
    return 0


# -- the summary -------------------------------------------------------------------------------
def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    machine = summary["machine"]
    model = summary.get("model", {})
    torch_info = model.get("machine", {})
    gpu = torch_info.get("gpu_name") or machine.get("nvidia_smi") or "no GPU"
    lines = [
        f"## gpu-check: {gpu}; torch {torch_info.get('torch', machine['packages'].get('torch'))}"
        f" (CUDA {torch_info.get('cuda_runtime')}); {'PASS' if summary['ok'] else 'FAIL'}"
        f" in {summary['wall_s']:.0f} s",
        "",
    ]
    tests = summary.get("tests")
    if tests is not None:
        parts = [f"{d} {c['passed']} passed / {c['failed'] + c['errors']} failed"
                 + (f" / {c['skipped']} skipped" if c["skipped"] else "")
                 for d, c in sorted(tests.get("by_dtype", {}).items())]
        status = "ok" if tests.get("ok") else f"FAIL {tests.get('error', '')}".strip()
        lines.append(f"tests ({tests['selection']}): {'; '.join(parts) or 'none ran'} — {status}")
    if model:
        lines.append(f"model: {model.get('note', '')}"
                     + (f"; {model['parameters'] / 1e6:.1f}M parameters"
                        if model.get("parameters") else ""))
        for dtype, a in model.get("agreement", {}).items():
            if "checks" in a:
                lines.append(
                    f"agreement {dtype} ({a.get('rule')}): {a['exact']} exact, "
                    f"{a['near_tie']} near-tie, {a['diverged']} diverged of {a['requests']}; "
                    f"max gap {a['max_gap']:.4f}; an adapter changes the output: "
                    f"{a.get('adapter_changes_output', '?')} — {'ok' if a['ok'] else 'FAIL'}"
                )
            else:
                lines.append(f"agreement {dtype}: {a.get('skipped') or a.get('error') or '?'}")
        for error in model.get("errors", []):
            lines.append(f"error: {error.splitlines()[0]}")
        if model.get("error"):
            lines.append(f"model part: {model['error']}")
        rows = model.get("throughput", [])
        if rows:
            lines += [
                "",
                "| system | K | C | decode tok/s | total tok/s | TTFT p50 ms | peak GiB "
                "| KV cache |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            for row in rows:
                system = model.get("systems", {}).get(row["system"], {})
                kv = system.get("kv_cache")
                kv_text = (f"{kv['num_blocks']}x{kv['block_size']} tok, "
                           f"{kv['nbytes'] / GiB:.2f} GiB" if kv else "-")
                lines.append(
                    f"| {row['system']} | {row['adapters']} | {row['batch']} "
                    f"| {_fmt(row.get('decode_tok_s'))} | {_fmt(row.get('total_tok_s'))} "
                    f"| {_fmt(row.get('ttft_p50_s'), 1000)} "
                    f"| {_fmt(system.get('peak_memory_bytes'), 1 / GiB, 2)} | {kv_text} |"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--worker"]:  # the model part's subprocess (run_model)
        return worker_main(Path(args[1]))
    plan, out = build_plan(args)
    started = time.time()
    t0 = time.monotonic()
    deadline = t0 + plan.budget_s
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "tool": "tuneserve gpu-check",
        "schema": SCHEMA,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "plan": asdict(plan),
        "agreement_rule": "float32: exact greedy tokens; bfloat16/float16: the first divergence "
        "is accepted iff the reference scores the engine's token within the tolerance of its "
        "best (tests: 0.03; model: plan.tolerance), nothing compared after it",
        "machine": _machine(),
        "ok": False,
    }

    def save() -> None:
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        _write_json(out, summary)

    save()
    if "tests" in plan.sections:
        # at most 40% of the budget, so the model part keeps its share
        share = 0.4 * plan.budget_s if "model" in plan.sections else plan.budget_s
        timeout = min(share, deadline - time.monotonic() - 5)
        print(f"[gpu-check] tests: {plan.tests_k!r} (up to {timeout:.0f} s)", flush=True)
        summary["tests"] = run_tests(plan, out_dir, timeout)
        save()
    if "model" in plan.sections:
        timeout = deadline - time.monotonic() - 5
        print(f"[gpu-check] model: {plan.shape} on {plan.device} (up to {timeout:.0f} s)",
              flush=True)
        summary["model"] = run_model(plan, out_dir, timeout)
    summary["ok"] = all(summary[s].get("ok") for s in plan.sections)
    summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print(markdown(summary), flush=True)
    print(f"\n[gpu-check] summary: {out}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
