"""The benchmark harness runs end to end and writes complete results (speed is not tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.__main__ import _parser, config_from
from benchmarks.client import PointRun, RequestResult, chunk_text
from benchmarks.model import prompt_ids, prompt_text
from benchmarks.report import compute_targets, markdown
from benchmarks.results import BenchConfig, Point, Results
from benchmarks.runner import percentile, summarize

REPO = Path(__file__).resolve().parent.parent
Completed = subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Completed]:
    """The harness in its smallest mode: a tiny model, two systems, three requests a point."""
    out = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, "-m", "benchmarks", "--size", "tiny",
            "--systems", "seed-way,peft-batch,llama.cpp,ceiling", "--concurrency", "1,2",
            "--adapters", "2", "--requests", "3", "--prompt-len", "16", "--max-tokens", "6",
            "--warmup", "1", "--out", str(out), "--cache-dir", str(out / "models"),
            "--llama-cpp-dir", str(out / "no-llama.cpp")]  # not built: skipped, saying how
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    return out, proc


def test_run_writes_complete_results(tiny_run: tuple[Path, Completed]) -> None:
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = Results.read(out / "results.json")
    assert res.date and res.command.startswith("python -m benchmarks")
    assert {"cpu", "cpus_logical", "torch", "transformers", "peft"} <= set(res.machine)
    assert [s.system for s in res.systems] == ["seed-way", "peft-batch", "llama.cpp", "ceiling"]
    llama = res.systems.pop(2)
    assert llama.status == "skipped"
    assert "python -m benchmarks build-llama-cpp" in (llama.reason or "")
    assert all(s.status == "ok" for s in res.systems), [s.reason for s in res.systems]
    skipped = [(p.system, p.status) for p in res.points if p.system == "llama.cpp"]
    assert skipped == [("llama.cpp", "skipped")] * 2
    expected = {("seed-way", 2, 1), ("seed-way", 2, 2), ("peft-batch", 2, 1),
                ("peft-batch", 2, 2), ("ceiling", 0, 1), ("ceiling", 0, 2)}
    measured = [p for p in res.points if p.system != "llama.cpp"]
    assert {(p.system, p.adapters, p.concurrency) for p in measured} == expected
    for p in measured:
        assert p.status == "ok", (p.system, p.reason, p.errors)
        assert p.requests == p.requests_ok == 3
        assert p.completion_tokens == 3 * 6, (p.system, p.reason)  # EOS ignored: all tokens made
        for metric in Point.METRICS:
            value = getattr(p, metric)
            assert value is not None and value > 0, (p.system, p.concurrency, metric, value)
    # The plots and the markdown report are written beside the JSON.
    for name in ("throughput_vs_concurrency.png", "throughput_vs_adapters.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| peft-batch | 2 | 2 |" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["config"]["requests"] == 3


def test_unsupported_points_are_recorded_as_skipped(tmp_path: Path) -> None:
    """tf-serve-cb serves merged weights only: K > 1 is a skipped point with its reason."""
    from benchmarks.runner import run_http_system
    from benchmarks.systems import TransformersServeCB

    cfg = BenchConfig(systems=["tf-serve-cb"], concurrency=[1], adapters=[8], size="tiny")
    run, points = run_http_system(TransformersServeCB(), None, cfg, tmp_path,  # type: ignore[arg-type]
                                  log=lambda _: None)
    assert run.status == "skipped" and "K=1 only" in (run.reason or "")
    assert [(p.status, p.adapters) for p in points] == [("skipped", 8)]


def _fake_llama_server(home: Path) -> Path:
    """An executable where `build-llama-cpp` puts llama-server (never run by these tests)."""
    binary = home / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    return binary


def test_llama_cpp_says_why_it_cannot_run(tmp_path: Path) -> None:
    """Without the build the reason is the command that builds it; built, it runs on the real
    model only (llama.cpp has no word-level tokenizer for the random-weight ones)."""
    from benchmarks.runner import run_http_system
    from benchmarks.systems import http_system

    home = tmp_path / "llama.cpp"
    cfg = BenchConfig(systems=["llama.cpp"], concurrency=[1], adapters=[1, 8], size="smollm2",
                      llama_cpp_dir=home)
    system = http_system("llama.cpp", cfg)
    run, points = run_http_system(system, None, cfg, tmp_path,  # type: ignore[arg-type]
                                  log=lambda _: None)
    assert run.status == "skipped"
    assert f"python -m benchmarks build-llama-cpp --llama-cpp-dir {home}" in (run.reason or "")
    assert [(p.status, p.adapters) for p in points] == [("skipped", 1), ("skipped", 8)]

    _fake_llama_server(home)
    assert system.unsupported(8) is None
    for size in ("tiny", "bench"):
        why = http_system("llama.cpp-f16", cfg.model_copy(update={"size": size})).unsupported(1)
        assert "word-level tokenizer" in (why or "") and "--size smollm2" in (why or "")


def test_build_llama_cpp_returns_an_existing_build(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    binary = _fake_llama_server(tmp_path)
    assert main(["build-llama-cpp", "--llama-cpp-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(binary)


def test_llama_cpp_request_picks_its_adapter() -> None:
    """One llama-server holds all K adapters; a request applies one by its --lora index. A
    request without `lora` would get every adapter at scale 1, so the base sends a zero."""
    from benchmarks.systems import adapter_index, llama_cpp_body

    body = llama_cpp_body("w5 w6", "a3", 16)
    assert body["lora"] == [{"id": 3, "scale": 1.0}]
    assert body["prompt"] == "w5 w6" and body["max_tokens"] == 16 and "model" not in body
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True}  # the count of tokens made
    assert llama_cpp_body("w5", "base", 16)["lora"] == [{"id": 0, "scale": 0.0}]
    assert [adapter_index(n) for n in ("a0", "a31", "base", "a", "b2")] == [0, 31, None, None,
                                                                            None]


def test_llama_server_command_line(tmp_path: Path) -> None:
    from benchmarks import llama_cpp

    # every slot of --parallel gets ctx/parallel: prompt + new tokens + margin
    assert llama_cpp.context_size(32, 128, 128) == 32 * (128 + 128 + llama_cpp.CTX_MARGIN)
    loras = [tmp_path / "a0.gguf", tmp_path / "a1.gguf"]
    argv = llama_cpp.server_argv(Path("llama-server"), tmp_path / "m.gguf", loras, 8080,
                                 parallel=8, ctx_size=2560, n_threads=2)
    # one --lora with both (several --lora flags: llama-server keeps only the last)
    assert argv.count("--lora") == 1
    assert argv[argv.index("--lora") + 1] == f"{loras[0]},{loras[1]}"
    assert "--lora-init-without-apply" in argv
    assert argv[argv.index("--parallel") + 1] == "8"
    assert argv[argv.index("--ctx-size") + 1] == "2560"
    bare = llama_cpp.server_argv(Path("llama-server"), tmp_path / "m.gguf", [], 8080, 1, 320, 2)
    assert "--lora" not in bare and "--lora-init-without-apply" not in bare


def test_llama_cpp_converters_get_a_config_they_accept(tmp_path: Path) -> None:
    """llama.cpp's converters refuse a config.json naming the GGUF quantizer: they get a copy
    without it, the other files linked."""
    from benchmarks.llama_cpp import _convertible

    base = tmp_path / "base"
    base.mkdir()
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}
    (base / "config.json").write_text(json.dumps(config))
    (base / "model.safetensors").write_bytes(b"weights")
    with _convertible(base) as folder:
        assert folder != base
        assert json.loads((folder / "config.json").read_text()) == {"model_type": "llama"}
        assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((base / "config.json").read_text()) == config  # the original untouched
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with _convertible(base) as folder:
        assert folder == base


def test_targets_against_llama_cpp() -> None:
    cfg = BenchConfig(systems=["tuneserve", "llama.cpp"], concurrency=[1, 32], adapters=[1, 8])

    def pt(system: str, k: int, c: int, tps: float) -> Point:
        return Point(system=system, adapters=k, concurrency=c, output_tokens_per_s=tps)

    res = Results(date="d", command="c", machine={}, config=cfg, model={}, points=[
        pt("tuneserve", 1, 1, 50.0), pt("llama.cpp", 1, 1, 40.0),
        pt("tuneserve", 1, 32, 300.0), pt("llama.cpp", 1, 32, 200.0),
        pt("tuneserve", 8, 32, 280.0), pt("llama.cpp", 8, 32, 70.0),
    ])
    targets = {t.name: t for t in compute_targets(res)}
    assert targets["tuneserve / llama.cpp throughput C=1, K=1"].value == pytest.approx(1.25)
    assert targets["tuneserve / llama.cpp throughput C=1, K=1"].met is True
    assert targets["tuneserve / llama.cpp throughput C=32, K=1"].met is False  # 1.5x < 2x
    assert targets["tuneserve / llama.cpp throughput C=32, K=8"].value == pytest.approx(4.0)


def test_a_run_of_one_concurrency_and_one_k_has_only_the_targets_that_fit() -> None:
    cfg = BenchConfig(systems=["tuneserve", "llama.cpp"], concurrency=[1], adapters=[1])
    res = Results(date="d", command="c", machine={}, config=cfg, model={}, points=[
        Point(system="tuneserve", adapters=1, concurrency=1, output_tokens_per_s=20.0),
        Point(system="llama.cpp", adapters=1, concurrency=1, output_tokens_per_s=25.0),
    ])
    names = [t.name for t in compute_targets(res)]
    assert "tuneserve / llama.cpp throughput C=1, K=1" in names
    assert names.count("tuneserve / llama.cpp throughput C=1, K=1") == 1
    assert not [n for n in names if "K=1 / K=1" in n or "C=1 / C=1" in n], names
    target = next(t for t in compute_targets(res) if "llama.cpp" in t.name)
    assert target.goal == ">= 1.0x" and target.met is False  # 0.8x


def test_prompts_have_exactly_the_asked_length(tmp_path: Path) -> None:
    from benchmarks.model import build_tokenizer

    tokenizer = build_tokenizer(512)
    text = prompt_text(7, 128, 512)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 128 and ids == prompt_ids(7, 128, 512)
    assert min(ids) >= 3  # no special tokens in prompts
    assert prompt_text(7, 128, 512) != prompt_text(8, 128, 512)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        pytest.param([], 50, None, id="empty"),
        pytest.param([3.0], 99, 3.0, id="one"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.5, id="median-between"),
        pytest.param(list(map(float, range(101))), 99, 99.0, id="p99"),
    ],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(
    ("event", "text"),
    [
        pytest.param({"choices": [{"text": " w5"}]}, " w5", id="completions"),
        pytest.param({"choices": [{"delta": {"content": "w6"}}]}, "w6", id="chat"),
        pytest.param({"choices": [], "usage": {"completion_tokens": 3}}, "", id="usage-only"),
        pytest.param({"choices": [{"delta": {"role": "assistant"}}]}, "", id="role-only"),
    ],
)
def test_chunk_text(event: dict[str, object], text: str) -> None:
    assert chunk_text(event) == text


def test_summarize_and_targets() -> None:
    cfg = BenchConfig(concurrency=[1, 8], adapters=[1, 8], requests=2, max_tokens=4)
    good = RequestResult(ok=True, ttft_s=0.1, latency_s=0.4, completion_tokens=4,
                         itl_s=[0.1, 0.1, 0.1])
    bad = RequestResult(error="HTTP 500: boom")
    point = summarize("tuneserve", 1, 8, cfg, PointRun(2.0, [good, bad]), 100.0)
    assert point.status == "ok" and point.requests_ok == 1
    assert point.output_tokens_per_s == pytest.approx(2.0)
    assert point.ttft_p50_ms == pytest.approx(100.0) and point.itl_p50_ms == pytest.approx(100.0)
    assert point.tpot_p50_ms == pytest.approx(100.0)
    assert "1 of 2 requests failed" in (point.reason or "") and point.errors == ["HTTP 500: boom"]
    failed = summarize("seed-way", 1, 8, cfg, PointRun(1.0, [bad]), 1.0)
    assert failed.status == "failed" and failed.output_tokens_per_s is None

    def pt(system: str, k: int, c: int, tps: float, ttft: float = 10.0) -> Point:
        return Point(system=system, adapters=k, concurrency=c, output_tokens_per_s=tps,
                     ttft_p50_ms=ttft)

    res = Results(date="d", command="c", machine={}, config=cfg, model={}, points=[
        pt("tuneserve", 1, 8, 300.0, 20.0), pt("tuneserve", 1, 1, 50.0, 10.0),
        pt("tuneserve", 8, 8, 290.0), pt("seed-way", 1, 8, 10.0), pt("peft-batch", 1, 8, 250.0),
        pt("ceiling", 0, 8, 280.0),
    ])
    targets = {t.name: t for t in compute_targets(res)}
    assert targets["tuneserve / seed-way throughput"].value == pytest.approx(30.0)
    assert targets["tuneserve / seed-way throughput"].met is True
    assert targets["tuneserve / peft-batch throughput"].met is False  # 1.2x < 1.5x
    assert targets["tuneserve / tf-serve-cb throughput"].value is None  # not measured
    assert targets["tuneserve throughput K=8 / K=1"].met is True
    assert targets["tuneserve TTFT p50 C=8 / C=1"].value == pytest.approx(2.0)
    res.targets = list(targets.values())
    assert "| tuneserve / ceiling throughput | >= 1.0x (C=8, K=1) | 1.07 | yes |" in markdown(res)


def test_quick_preset_and_overrides() -> None:
    quick = config_from(_parser().parse_args(["run", "--quick"]))
    assert quick.quick and quick.concurrency == [1, 8] and quick.adapters == [1, 8]
    assert quick.requests == 16 and quick.size == "bench"  # quick: the small random model
    assert config_from(_parser().parse_args(["run"])).size == "smollm2"  # full: the real one
    full = config_from(_parser().parse_args(
        ["run", "--systems", "tuneserve,ceiling", "--concurrency", "32,1", "--tuneserve-engine",
         "default"]))
    assert full.systems == ["tuneserve", "ceiling"] and full.concurrency == [1, 32]
    assert full.adapters == [1, 8, 32] and full.requests == 64 and full.tuneserve_engine is None
    assert full.arrivals == "burst"  # BENCHMARK.md's closed loop
    staggered = config_from(_parser().parse_args(["run", "--arrivals", "staggered"]))
    assert staggered.arrivals == "staggered"
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--systems", "vllm"])


def test_tuneserve_bench_finds_the_harness() -> None:
    from tuneserve.cli.bench import find_checkout

    assert (find_checkout() / "benchmarks" / "__main__.py").is_file()


def test_runtime_adapters_writes_every_metric(tmp_path: Path) -> None:
    """benchmarks/runtime_adapters.py against one real server, the tiny model, short windows."""
    from benchmarks.runtime_adapters import METRICS

    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "benchmarks.runtime_adapters",
        "--quick",
        "--size",
        "tiny",
        "--window",
        "2",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "models"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["date"] and res["command"].startswith("python -m benchmarks.runtime_adapters")
    assert {"cpu", "cpus_logical", "torch", "transformers", "peft"} <= set(res["machine"])
    assert set(res["metrics"]) == set(METRICS)
    for metric in METRICS:
        value = res["metrics"][metric]
        assert isinstance(value, (int, float)) and value > 0, (metric, value)
    assert res["traffic"]["error_count"] == 0, res["traffic"]["errors"]
    assert [w["kind"] for w in res["windows"]] == ["A", "B", "B", "A"]
    assert all(w["replaces"] >= 2 for w in res["windows"][1:3])  # one every 0.5 s in 2 s
    assert len(res["samples"]["load_s"]) == 5 and len(res["samples"]["ttft_on_demand_s"]) == 3
    assert "| load (POST, new name) p50 / p90 |" in (out / "report.md").read_text()


def test_sizes_on_the_command_line() -> None:
    """Every size, the real one included, is a --size choice (and `tuneserve bench` passes it)."""
    cfg = config_from(_parser().parse_args(["run", "--quick", "--size", "smollm2"]))
    assert cfg.size == "smollm2" and cfg.quick
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--size", "huge"])


@pytest.mark.real_model
def test_smollm2_size_resolves_and_its_adapters_load(demo_cache: Path, smollm2_base: Path) -> None:
    """--size smollm2: the converted SmolLM2 as the base (the run's one copy, found by its hash),
    the harness's random adapters built for it and served, real-text prompts of exact length."""
    from benchmarks.model import LORA_TARGETS, ensure_bench_model, load_tokenizer
    from benchmarks.peers.ceiling import prompt_source

    from tuneserve.models.loader import load_served_model

    bench = ensure_bench_model(demo_cache, "smollm2", adapters=2)
    assert bench.base == smollm2_base and bench.real
    assert list(bench.adapters) == ["a0", "a1"]
    merged = json.loads((bench.merged / "config.json").read_text())
    assert merged["eos_token_id"] is None  # for transformers serve, which has no ignore_eos

    served = load_served_model(
        str(bench.base), dict(bench.adapters), dtype="float32", device="cpu", max_model_len=256
    )
    assert served.adapter_errors == {}
    for spec in served.adapters.values():
        assert (spec.rank, spec.alpha) == (16, 32.0)
        assert sorted(spec.target_modules) == sorted(LORA_TARGETS)

    tokenizer = load_tokenizer(bench.base)
    texts = [bench.prompt_text(i, 64) for i in range(3)]
    assert len(set(texts)) == 3
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 64 and ids == bench.prompt_ids(i, 64)
        assert " the " in text  # English, not the bench model's "w17 w3"
    # the ceiling peer gets the same kind of prompts as ids
    assert prompt_source(bench.base, "smollm2", 49152)(0, 64) == bench.prompt_ids(0, 64)


def test_lora_forms_times_every_step_in_every_form(tmp_path: Path) -> None:
    """`benchmarks.lora_forms` on the tiny model, one round: each step in each setting."""
    out = tmp_path / "forms.json"
    argv = [sys.executable, "-m", "benchmarks.lora_forms", "--size", "tiny", "--cache",
            str(tmp_path / "models"), "--rounds", "1", "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["step"] for r in results] == [
        "decode-turns", "decode-random", "decode-one", "prefill-mix"
    ]
    for row in results:
        assert all(row[setting] > 0 for setting in ("dense", "grouped", "auto")), row
