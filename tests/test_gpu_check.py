"""scripts/gpu-check (benchmarks/gpu_check.py) runs end to end on a CPU and writes its summary.

The real thing runs on a lent GPU; here its CPU mode with a tiny model and tiny sizes checks the
logic: the pytest part and its per-dtype counts, the model part's throughput points, KV cache,
memory and agreement records, the JSON and the markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_on_cuda_are_the_issues_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    plan, out = gpu_check.build_plan([])
    assert (plan.device, plan.shape, plan.dtype) == ("cuda", "smollm2", "bfloat16")
    assert (plan.batches, plan.prompt_len, plan.new_tokens, plan.adapters) == (
        [1, 8, 32], 128, 128, 8
    )
    assert plan.kv_cache_memory == 4 * 2**30 and plan.tests_k == "cuda"
    assert set(plan.agree_dtypes) == {"bfloat16", "float16", "float32"}
    assert plan.budget_s <= 420 and out == Path("gpu-check.json")
    monkeypatch.setenv("OUT", "/somewhere")
    assert gpu_check.build_plan([])[1] == Path("/somewhere/gpu-check.json")


def test_junit_counts_per_dtype(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase name="test_a[llama-cuda-bfloat16]"/>'
        '<testcase name="test_a[qwen2-cuda-float16]"><failure message="token 3: 7 scores 0.2'
        ' below the best 9">trace</failure></testcase>'
        '<testcase name="test_a[qwen2-cuda-float32]"><skipped message="no CUDA device"/>'
        "</testcase>"
        '<testcase name="test_b"/>'
        "</testsuite></testsuites>"
    )
    parsed = gpu_check.parse_junit(xml)
    assert parsed["by_dtype"]["bfloat16"]["passed"] == 1
    assert parsed["by_dtype"]["float16"]["failed"] == 1
    assert parsed["by_dtype"]["float32"]["skipped"] == 1
    assert parsed["by_dtype"]["other"]["passed"] == 1
    assert parsed["failures"][0]["test"] == "test_a[qwen2-cuda-float16]"
    assert "scores 0.2" in parsed["failures"][0]["message"]


def test_a_pytest_run_cut_short_is_counted_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "tests.log"
    log.write_text(
        "tests/engine/test_continuous.py::test_a[llama-cuda-float32] PASSED   [ 16%]\n"
        "tests/engine/test_continuous.py::test_a[llama-cuda-bfloat16] FAILED  [ 33%]\n"
        "tests/engine/test_continuous.py::test_a[llama-cuda-float16] PASSED   [ 50%]\n"
    )
    counts = gpu_check.parse_log(log)["by_dtype"]
    assert counts["float32"]["passed"] == counts["float16"]["passed"] == 1
    assert counts["bfloat16"]["failed"] == 1


@pytest.mark.slow
def test_cpu_quick_run_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "out" / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "gpu-check"),
            "--device", "cpu", "--quick", "--shape", "tiny",
            # one fast test of the file: the pytest part's plumbing, not the engine's checks
            "--tests-k", "packed_attention and full",
            "--cache", str(tmp_path / "cache"),
            "--out", str(out),
            "--budget", "120",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] is True
    assert {"machine", "plan", "tests", "model", "agreement_rule"} <= set(summary)
    assert (out.parent / "gpu-check-tests.log").exists()
    assert (out.parent / "gpu-check-model.log").exists()

    tests = summary["tests"]
    assert tests["passed"] >= 1 and tests["failed"] == 0 and tests["ok"]

    model = summary["model"]
    assert model["errors"] == [] and model["build_s"] > 0 and model["parameters"] > 0
    rows = {(r["system"], r["batch"]): r for r in model["throughput"]}
    assert set(rows) == {(s, c) for s in ("hf", "engine", "engine-lora") for c in (1, 4)}
    assert all(r["decode_tok_s"] > 0 for r in rows.values())
    assert all(rows[("engine", c)]["ttft_p50_s"] > 0 for c in (1, 4))
    assert rows[("engine-lora", 4)]["adapters"] == 2
    for system in ("hf", "engine", "engine-lora"):
        assert model["systems"][system]["peak_memory_bytes"] > 0
        assert model["systems"][system]["weights_bytes"] > 0
    kv = model["systems"]["engine"]["kv_cache"]
    assert kv["num_blocks"] > 0 and kv["block_size"] > 0 and kv["nbytes"] > 0

    agreement = model["agreement"]["float32"]
    assert agreement["ok"] and agreement["exact"] == agreement["requests"] == 3
    assert agreement["adapter_changes_output"] is True

    assert "| engine-lora | 2 | 4 |" in done.stdout  # the markdown table
    assert "PASS" in done.stdout


def test_the_module_runs_as_the_wrapper_calls_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0 and "agreement rule" in done.stdout
