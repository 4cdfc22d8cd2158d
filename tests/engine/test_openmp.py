"""One OpenMP team in the process (engine/openmp.py): a thread that built an engine hands its
idle workers back, and so does the engine thread whenever it goes idle.

The workers are counted as the OS threads of the process that Python's threading does not
know (OpenMP starts them in C).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.engine.tiny import TinyFamily
from tuneserve.engine import openmp

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="threads are counted in /proc"
)


def foreign_threads() -> int:
    known = {t.native_id for t in threading.enumerate()}
    return len({int(tid) for tid in os.listdir("/proc/self/task")} - known)


def test_release_hands_back_the_calling_threads_workers() -> None:
    seen: dict[str, object] = {}

    def work() -> None:  # a fresh thread: a team of its own, whatever this process did before
        before = foreign_threads()
        x = torch.ones(4_000_000)
        torch.add(x, x).sum()  # parallel: this thread starts a team of get_num_threads()
        seen["with_team"] = foreign_threads() - before
        seen["released"] = openmp.release_thread_team()
        seen["after"] = foreign_threads() - before

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert seen == {"with_team": torch.get_num_threads() - 1, "released": True, "after": 0}


SCRIPT = """
import asyncio, json, os, sys, threading, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuneserve.engine.continuous import ContinuousBatchingEngine
from tuneserve.engine.types import GenerationRequest, SamplingParams
from tuneserve.models.types import LoadedModel

def foreign():
    known = {t.native_id for t in threading.enumerate()}
    return len({int(t) for t in os.listdir("/proc/self/task")} - known)

torch.set_num_threads(2)
counts = {"start": foreign()}
base = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(base)
x = torch.ones(4_000_000)
torch.add(x, x).sum()  # as a loader's own ops do: this thread now has a team
counts["loaded"] = foreign()
served = LoadedModel(base_name="tiny", base_path=base, model=model, tokenizer=tokenizer,
                     adapters={}, max_model_len=64, eos_token_ids=(tokenizer.eos_token_id,))
engine = ContinuousBatchingEngine(served, max_num_seqs=2, max_model_len=64)
counts["built"] = foreign()
engine.start()

async def one():
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    async for _ in engine.submit(GenerationRequest("r", tuple(range(3, 40)), params, None)):
        counts["busy"] = max(counts.get("busy", 0), foreign())

asyncio.run(one())
deadline = time.monotonic() + 10
while foreign() > counts["built"] and time.monotonic() < deadline:
    time.sleep(0.01)
counts["idle"] = foreign()
engine.shutdown()
print(json.dumps(counts))
"""


def test_an_engine_leaves_one_team_working_and_none_idle(tiny_llama: TinyFamily) -> None:
    """The thread that loaded the model (and ran torch ops) keeps no team once it has built the
    engine; the engine thread's team works while it decodes and is handed back when idle."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama.base)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["loaded"] == counts["start"] + 1  # two threads: one worker beside this one
    assert counts["built"] == counts["start"], counts
    assert counts["busy"] == counts["start"] + 1, counts  # the engine thread's worker
    assert counts["idle"] == counts["start"], counts


def test_without_a_runtime_nothing_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openmp, "_pause_all", lambda: None)
    assert openmp.release_thread_team() is False


def test_the_runtime_found_is_the_one_torch_loaded() -> None:
    pause = openmp._pause_all()
    assert pause is not None
    maps = Path("/proc/self/maps").read_text()
    assert any(name in maps for name in openmp.RUNTIMES)
