"""Adapters at runtime: what loading, replacing and unloading adapters costs on a live server.

One real `tuneserve serve` (the bench model, `--adapter-root` a temporary folder, `--max-loras 8`,
`--adapter-rescan-interval 0` so that only requests and the admin API rescan the root) and, over
HTTP:

  1. load      POST /v1/adapters of a new name (its folder copied into the root beforehand)
  2. replace   POST /v1/adapters of a served name with another version: on an idle server, and
               while C streaming requests on other adapters run
  3. traffic   C closed-loop streaming clients on other adapters; completion tok/s and the
               inter-token latency (ITL) over fixed windows with no replace vs windows with a
               replace every 0.5 s, in the order A B B A (drift on a shared machine cancels)
  4. TTFT      the first request naming an adapter folder that was copied into the root and never
               POSTed (it triggers the rescan and the load) vs the same request again (the
               adapter now hot), and the same request on the base model
  5. unload    DELETE /v1/adapters/NAME, of adapters loaded but not used (state cpu) and of
               adapters that served a request (hot)

    python -m benchmarks.runtime_adapters --quick       # ~45 s on 2 cores: 4 windows of 8 s
    python -m benchmarks.runtime_adapters               # ~1.5 min: 10 loads, 4 windows of 15 s

Writes results.json (every metric, the samples, the machine, the command, the date), report.md
and the server's log into --out (default benchmarks/out/runtime_adapters/full or quick). The
client shares the machine with the server: compare numbers taken in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.client import chunk_text, completion_body, one_request, sse_events, words
from benchmarks.model import SIZES, BenchModel, ensure_bench_model
from benchmarks.procs import ServerProcess, free_port
from benchmarks.results import machine_info, now_iso, portable
from benchmarks.runner import percentile

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BASE_NAME = "base"
TRAFFIC_ADAPTERS = ["a0", "a1", "a2", "a3"]  # what the C streaming clients use
LOAD_SOURCES = ["a4", "a5"]  # copied into the root for loads and on-demand requests
SWAP_SOURCES = ["a6", "a7"]  # the two versions a replace alternates between
SOURCE_ADAPTERS = 8  # a0..a7 built in the cache
MAX_LORAS = 8
ADMIN_KEY = secrets.token_urlsafe(16)  # the admin routes are closed without one


@dataclass
class Config:
    size: str = "bench"
    quick: bool = False
    loads: int = 10  # distinct new adapters POSTed (then DELETEd)
    replaces: int = 10  # replaces on the idle server
    ondemand: int = 5  # adapters loaded on demand by name
    concurrency: int = 8
    window_s: float = 15.0
    plan: str = "ABBA"  # A: a window with no replace, B: a replace every swap_every_s
    swap_every_s: float = 0.5
    prompt_len: int = 128
    max_tokens: int = 128  # per traffic request (EOS ignored)
    ttft_max_tokens: int = 4
    settle_s: float = 2.0  # traffic runs this long after every client's first token
    startup_timeout_s: float = 300.0

    @classmethod
    def preset(cls, quick: bool) -> Config:
        if quick:
            return cls(
                quick=True,
                loads=5,
                replaces=5,
                ondemand=3,
                window_s=8.0,
                max_tokens=64,
                settle_s=1.0,
            )
        return cls()


# -- HTTP --------------------------------------------------------------------------------------
async def timed(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[float, dict[str, Any]]:
    """(seconds, JSON answer) of one admin call; anything but a 200 stops the benchmark."""
    start = time.perf_counter()
    response = await client.request(method, path, json=body)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(
            f"{method} {path} {body or ''}: HTTP {response.status_code}: {response.text[:500]}"
        )
    return elapsed, response.json()


async def ttft(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> float:
    result = await one_request(
        client, "/v1/completions", completion_body(model, prompt, max_tokens)
    )
    if not result.ok:
        raise RuntimeError(f"request on {model!r} failed: {result.error}")
    return result.ttft_s


def copy_adapter(source: Path, root: Path, name: str) -> None:
    """Into the root under `name`, whole before the server can see it (no rescan runs now)."""
    tmp = root / f".{name}.tmp"
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("done.json"))
    os.replace(tmp, root / name)


# -- the traffic -------------------------------------------------------------------------------
@dataclass
class Traffic:
    tokens: list[tuple[float, float | None]] = field(default_factory=list)  # (arrival, ITL)
    first_token: set[int] = field(default_factory=set)  # clients that have seen a token
    errors: list[str] = field(default_factory=list)
    requests: int = 0


async def stream_once(
    client: httpx.AsyncClient, body: dict[str, Any], traffic: Traffic, client_id: int
) -> None:
    """One streaming request; each token's arrival (and its gap from the previous chunk, shared
    evenly among the chunk's tokens, as in client.py) goes into `traffic.tokens`."""
    last: float | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"HTTP {response.status_code}: {detail}")
        async for event in sse_events(response):
            if "error" in event:
                raise RuntimeError(f"stream error: {str(event['error'])[:300]}")
            n = words(chunk_text(event))
            if n == 0:
                continue
            now = time.perf_counter()
            gap = None if last is None else (now - last) / n
            traffic.tokens += [(now, gap)] * n
            traffic.first_token.add(client_id)
            last = now


async def traffic_client(
    client: httpx.AsyncClient, cfg: Config, bench: BenchModel, client_id: int, traffic: Traffic
) -> None:
    """A closed loop on one adapter until cancelled."""
    adapter = TRAFFIC_ADAPTERS[client_id % len(TRAFFIC_ADAPTERS)]
    i = 0
    while True:
        prompt = bench.prompt_text(1_000_000 + client_id * 10_000 + i, cfg.prompt_len)
        i += 1
        traffic.requests += 1
        try:
            await stream_once(
                client, completion_body(adapter, prompt, cfg.max_tokens), traffic, client_id
            )
        except (httpx.HTTPError, json.JSONDecodeError, RuntimeError) as exc:
            traffic.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(0.1)


async def swapper(
    client: httpx.AsyncClient, cfg: Config, until: float, turn: list[int], latencies: list[float]
) -> None:
    """Replace "swap" every cfg.swap_every_s until `until` (a slow one is not caught up on)."""
    tick = time.perf_counter()
    while tick < until:
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        turn[0] += 1
        path = f"swap-v{turn[0] % 2 + 1}"
        elapsed, answer = await timed(
            client, "POST", "/v1/adapters", {"name": "swap", "path": path}
        )
        if not answer.get("replaced"):
            raise RuntimeError(f"POST swap={path} did not replace: {answer}")
        latencies.append(elapsed)
        tick = max(tick + cfg.swap_every_s, time.perf_counter())


def window_stats(traffic: Traffic, bounds: list[tuple[float, float]]) -> dict[str, float | None]:
    """tok/s and ITL percentiles of the tokens that arrived inside the windows `bounds`."""
    inside = [(t, gap) for t, gap in traffic.tokens if any(a <= t < b for a, b in bounds)]
    gaps = [gap for _, gap in inside if gap is not None]
    seconds = sum(b - a for a, b in bounds)
    return {
        "tokens": len(inside),
        "tok_s": len(inside) / seconds if seconds > 0 else None,
        "itl_p50_ms": _ms(percentile(gaps, 50)),
        "itl_p99_ms": _ms(percentile(gaps, 99)),
    }


# -- the run -----------------------------------------------------------------------------------
async def measure(
    cfg: Config, base_url: str, root: Path, bench: BenchModel, log: Any
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    limits = httpx.Limits(
        max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency + 4
    )
    timeout = httpx.Timeout(120.0, connect=30.0)
    # the admin routes need a key (the server's --admin-key); it opens /v1 as well
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=timeout, headers=headers
    ) as client:
        # warm-up: every traffic adapter in a slot, the code paths of a load and an on-demand load
        warm_prompt = bench.prompt_text(0, cfg.prompt_len)
        for model in [BASE_NAME, *TRAFFIC_ADAPTERS]:
            await ttft(client, model, warm_prompt, cfg.ttft_max_tokens)
        copy_adapter(bench.adapters[LOAD_SOURCES[0]], root, "warm-load")
        copy_adapter(bench.adapters[LOAD_SOURCES[1]], root, "warm-ondemand")
        first_load, _ = await timed(
            client, "POST", "/v1/adapters", {"name": "warm-load", "path": "warm-load"}
        )
        first_ondemand = await ttft(client, "warm-ondemand", warm_prompt, cfg.ttft_max_tokens)
        await timed(client, "DELETE", "/v1/adapters/warm-load")
        await timed(client, "DELETE", "/v1/adapters/warm-ondemand")

        # 4. TTFT: on demand (first request names a folder never POSTed) vs hot vs base
        log(f"TTFT: {cfg.ondemand} adapters loaded on demand")
        for i in range(cfg.ondemand):
            name = f"od{i}"
            prompt = bench.prompt_text(100 + i, cfg.prompt_len)
            copy_adapter(bench.adapters[LOAD_SOURCES[i % 2]], root, name)
            samples.setdefault("ttft_base_s", []).append(
                await ttft(client, BASE_NAME, prompt, cfg.ttft_max_tokens)
            )
            samples.setdefault("ttft_on_demand_s", []).append(
                await ttft(client, name, prompt, cfg.ttft_max_tokens)
            )
            samples.setdefault("ttft_hot_s", []).append(
                await ttft(client, name, prompt, cfg.ttft_max_tokens)
            )
        listing = (await client.get("/v1/adapters")).json()
        sources = {a["name"]: a["source"] for a in listing["data"]}
        ondemand_states = {
            a["name"]: a["state"] for a in listing["data"] if a["name"].startswith("od")
        }
        wrong = {
            f"od{i}": sources.get(f"od{i}")
            for i in range(cfg.ondemand)
            if sources.get(f"od{i}") != "share"
        }
        if wrong:
            raise RuntimeError(f"adapters not loaded on demand from the root: {wrong}")

        # 1. load: POST of a new name, folder already in the root
        log(f"load: {cfg.loads} new adapters")
        for i in range(cfg.loads):
            copy_adapter(bench.adapters[LOAD_SOURCES[i % 2]], root, f"load{i}")
        for i in range(cfg.loads):
            elapsed, answer = await timed(
                client, "POST", "/v1/adapters", {"name": f"load{i}", "path": f"load{i}"}
            )
            if answer.get("replaced"):
                raise RuntimeError(f"load{i} was reported as a replace: {answer}")
            samples.setdefault("load_s", []).append(elapsed)

        # 5. unload: DELETE, of the adapters just loaded (cpu) and of the on-demand ones (hot)
        log("unload")
        for i in range(cfg.loads):
            elapsed, _ = await timed(client, "DELETE", f"/v1/adapters/load{i}")
            samples.setdefault("unload_s", []).append(elapsed)
        for i in range(cfg.ondemand):
            elapsed, _ = await timed(client, "DELETE", f"/v1/adapters/od{i}")
            samples.setdefault("unload_hot_s", []).append(elapsed)

        # 2. replace on an idle server: "swap" alternates between two versions
        log(f"replace: {cfg.replaces} on the idle server")
        for i, source in enumerate(SWAP_SOURCES):
            copy_adapter(bench.adapters[source], root, f"swap-v{i + 1}")
        await timed(client, "POST", "/v1/adapters", {"name": "swap", "path": "swap-v1"})
        turn = [0]
        for _ in range(cfg.replaces):
            turn[0] += 1
            elapsed, answer = await timed(
                client, "POST", "/v1/adapters", {"name": "swap", "path": f"swap-v{turn[0] % 2 + 1}"}
            )
            if not answer.get("replaced"):
                raise RuntimeError(f"the replace was not reported as one: {answer}")
            samples.setdefault("replace_idle_s", []).append(elapsed)

        # 2 + 3. C streaming clients on other adapters; windows with and without replaces
        log(f"traffic: C={cfg.concurrency}, windows {cfg.plan} of {cfg.window_s:g} s")
        traffic = Traffic()
        clients = [
            asyncio.create_task(traffic_client(client, cfg, bench, c, traffic))
            for c in range(cfg.concurrency)
        ]
        windows: list[dict[str, Any]] = []
        busy: list[float] = []
        try:
            deadline = time.perf_counter() + 120.0
            while len(traffic.first_token) < cfg.concurrency:
                if time.perf_counter() > deadline or traffic.errors:
                    raise RuntimeError(f"the traffic did not start: {traffic.errors[:3]}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(cfg.settle_s)
            for kind in cfg.plan:
                start = time.perf_counter()
                end = start + cfg.window_s
                before = len(busy)
                if kind == "B":
                    await swapper(client, cfg, end, turn, busy)
                await asyncio.sleep(max(0.0, end - time.perf_counter()))
                windows.append(
                    {"kind": kind, "start": start, "end": end, "replaces": len(busy) - before}
                )
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
        samples["replace_busy_s"] = busy
        pooled = {
            kind: window_stats(
                traffic, [(w["start"], w["end"]) for w in windows if w["kind"] == kind]
            )
            for kind in "AB"
        }
        t0 = windows[0]["start"]
        for w in windows:
            w.update(window_stats(traffic, [(w["start"], w["end"])]))
            w["start_s"], w["end_s"] = round(w.pop("start") - t0, 3), round(w.pop("end") - t0, 3)
        return {
            "samples": samples,
            "windows": windows,
            "pooled": pooled,
            "ondemand_states_before_unload": ondemand_states,
            "warmup": {
                "first_load_ms": first_load * 1000,
                "first_on_demand_ttft_ms": first_ondemand * 1000,
            },
            "traffic": {
                "requests": traffic.requests,
                "errors": traffic.errors[:10],
                "error_count": len(traffic.errors),
            },
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _p(values: list[float], q: float) -> float | None:
    return _ms(percentile(values, q))


def metrics_of(run: dict[str, Any]) -> dict[str, float | None]:
    s, a, b = run["samples"], run["pooled"]["A"], run["pooled"]["B"]
    ratio = b["tok_s"] / a["tok_s"] if a["tok_s"] and b["tok_s"] is not None else None
    return {
        "load_p50_ms": _p(s["load_s"], 50),
        "load_p90_ms": _p(s["load_s"], 90),
        "replace_idle_p50_ms": _p(s["replace_idle_s"], 50),
        "replace_idle_p90_ms": _p(s["replace_idle_s"], 90),
        "replace_busy_p50_ms": _p(s["replace_busy_s"], 50),
        "replace_busy_p90_ms": _p(s["replace_busy_s"], 90),
        "tok_s_no_swaps": a["tok_s"],
        "tok_s_swaps": b["tok_s"],
        "tok_s_ratio": ratio,
        "itl_p50_ms_no_swaps": a["itl_p50_ms"],
        "itl_p99_ms_no_swaps": a["itl_p99_ms"],
        "itl_p50_ms_swaps": b["itl_p50_ms"],
        "itl_p99_ms_swaps": b["itl_p99_ms"],
        "ttft_on_demand_p50_ms": _p(s["ttft_on_demand_s"], 50),
        "ttft_hot_p50_ms": _p(s["ttft_hot_s"], 50),
        "ttft_base_p50_ms": _p(s["ttft_base_s"], 50),
        "unload_p50_ms": _p(s["unload_s"], 50),
        "unload_p90_ms": _p(s["unload_s"], 90),
        "unload_hot_p50_ms": _p(s["unload_hot_s"], 50),
    }


METRICS = (
    "load_p50_ms",
    "load_p90_ms",
    "replace_idle_p50_ms",
    "replace_idle_p90_ms",
    "replace_busy_p50_ms",
    "replace_busy_p90_ms",
    "tok_s_no_swaps",
    "tok_s_swaps",
    "tok_s_ratio",
    "itl_p50_ms_no_swaps",
    "itl_p99_ms_no_swaps",
    "itl_p50_ms_swaps",
    "itl_p99_ms_swaps",
    "ttft_on_demand_p50_ms",
    "ttft_hot_p50_ms",
    "ttft_base_p50_ms",
    "unload_p50_ms",
    "unload_p90_ms",
    "unload_hot_p50_ms",
)  # every one a positive number in a complete run


def markdown(res: dict[str, Any]) -> str:
    m, cfg = res["metrics"], res["config"]
    c, window, every = cfg["concurrency"], cfg["window_s"], cfg["swap_every_s"]

    def ms(key: str) -> str:
        return "-" if m.get(key) is None else f"{m[key]:,.1f}"

    def num(key: str, digits: int = 1) -> str:
        return "-" if m.get(key) is None else f"{m[key]:,.{digits}f}"

    n_b = sum(1 for w in res["windows"] if w["kind"] == "B")
    rows = [
        (
            "load (POST, new name) p50 / p90",
            f"{ms('load_p50_ms')} / {ms('load_p90_ms')} ms",
            f"{cfg['loads']} distinct adapters, folder already in the root",
        ),
        (
            "replace, idle p50 / p90",
            f"{ms('replace_idle_p50_ms')} / {ms('replace_idle_p90_ms')} ms",
            f"{cfg['replaces']} POSTs of a served name with another version",
        ),
        (
            f"replace, under C={c} traffic p50 / p90",
            f"{ms('replace_busy_p50_ms')} / {ms('replace_busy_p90_ms')} ms",
            f"every {every:g} s during the replace windows",
        ),
        (
            "traffic tok/s: no replaces / replaces",
            f"{num('tok_s_no_swaps')} / {num('tok_s_swaps')} (x{num('tok_s_ratio', 3)})",
            f"C={c} streams, {len(res['windows']) - n_b} + {n_b} windows of {window:g} s",
        ),
        (
            "ITL p50 / p99, no replaces",
            f"{ms('itl_p50_ms_no_swaps')} / {ms('itl_p99_ms_no_swaps')} ms",
            "",
        ),
        ("ITL p50 / p99, replaces", f"{ms('itl_p50_ms_swaps')} / {ms('itl_p99_ms_swaps')} ms", ""),
        (
            "TTFT p50: on demand / hot / base",
            " / ".join(
                ms(k) for k in ("ttft_on_demand_p50_ms", "ttft_hot_p50_ms", "ttft_base_p50_ms")
            )
            + " ms",
            f"{cfg['ondemand']} names, {cfg['prompt_len']}-token prompt",
        ),
        (
            "unload (DELETE) p50 / p90",
            f"{ms('unload_p50_ms')} / {ms('unload_p90_ms')} ms",
            "adapters loaded, never used (cpu)",
        ),
        (
            "unload (DELETE) of a hot adapter p50",
            f"{ms('unload_hot_p50_ms')} ms",
            "the on-demand ones, after their requests",
        ),
    ]
    lines = ["| measure | value | setting |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {note} |" for a, b, note in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runtime_adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5 loads, 5 replaces, 3 on-demand names, 4 windows (ABBA) of 8 s",
    )
    parser.add_argument("--size", choices=list(SIZES), default="bench")
    parser.add_argument(
        "--cache",
        "--cache-dir",
        dest="cache",
        type=Path,
        default=OUT / "models",
        help="where the bench model is built [benchmarks/out/models]",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder [benchmarks/out/runtime_adapters/full or quick]"
    )
    parser.add_argument("--loads", type=int, help="new adapters POSTed [10; quick 5]")
    parser.add_argument("--replaces", type=int, help="replaces on the idle server [10; quick 5]")
    parser.add_argument("--ondemand", type=int, help="adapters loaded on demand [5; quick 3]")
    parser.add_argument("--window", type=float, help="seconds per traffic window [15; quick 8]")
    parser.add_argument("--plan", help="windows in order, A: no replace, B: replaces [ABBA]")
    parser.add_argument("--concurrency", type=int, help="streaming clients in the traffic [8]")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens [128]")
    parser.add_argument("--max-tokens", type=int, help="tokens per traffic request [128; quick 64]")
    args = parser.parse_args(argv)

    cfg = Config.preset(args.quick)
    cfg.size = args.size
    for key in ("loads", "replaces", "ondemand", "plan", "concurrency", "prompt_len", "max_tokens"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.window is not None:
        cfg.window_s = args.window
    if set(cfg.plan) - {"A", "B"} or not {"A", "B"} <= set(cfg.plan):
        parser.error("--plan: A and B windows, at least one of each (e.g. AB, ABBA)")
    if min(cfg.loads, cfg.replaces, cfg.ondemand, cfg.concurrency) < 1 or cfg.window_s <= 0:
        parser.error("--loads, --replaces, --ondemand, --concurrency and --window must be > 0")
    out_dir = args.out or OUT / "runtime_adapters" / ("quick" if cfg.quick else "full")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.runtime_adapters", *argv])

    def log(msg: str) -> None:
        print(f"[runtime_adapters] {msg}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    date, machine = now_iso(), machine_info()
    log(f"bench model {cfg.size} in {args.cache}")
    bench = ensure_bench_model(args.cache, cfg.size, adapters=SOURCE_ADAPTERS)
    root = Path(tempfile.mkdtemp(prefix="tuneserve-root-"))
    for name in TRAFFIC_ADAPTERS:
        copy_adapter(bench.adapters[name], root, name)
    port = free_port()
    argv_server = [
        sys.executable,
        "-m",
        "tuneserve",
        "serve",
        "--base",
        str(bench.base),
        "--served-model-name",
        BASE_NAME,
        "--adapter-root",
        str(root),
        "--admin-key",
        ADMIN_KEY,
        "--adapter-rescan-interval",
        "0",
        "--engine",
        "continuous",
        "--max-loras",
        str(MAX_LORAS),
        "--max-batch-size",
        str(cfg.concurrency),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--no-ui",
        "--log-level",
        "warning",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    base_url = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        argv_server,
        out_dir / "server.log",
        f"{base_url}/ready",
        env={"GRADIO_ANALYTICS_ENABLED": "False"},
    )
    try:
        log(f"starting the server (log {out_dir / 'server.log'})")
        started = time.perf_counter()
        server.start(cfg.startup_timeout_s)
        startup_s = time.perf_counter() - started
        run = asyncio.run(measure(cfg, base_url, root, bench, log))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    machine["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res: dict[str, Any] = {
        "date": date,
        "command": command,
        "machine": machine,
        "config": asdict(cfg),
        "server": {
            "argv": shlex.join(argv_server),
            "startup_s": round(startup_s, 2),
            "adapter_root": "a temporary folder, removed after the run",
        },
        "metrics": metrics_of(run),
        **run,
        "duration_s": round(time.perf_counter() - began, 1),
    }
    report = markdown(res)
    (out_dir / "results.json").write_text(portable(json.dumps(res, indent=2)) + "\n")
    (out_dir / "report.md").write_text(report)
    print(report, end="")
    log(f"wrote {out_dir / 'results.json'} and report.md in {res['duration_s']:.0f} s")
    missing = [k for k, v in res["metrics"].items() if v is None or v <= 0]
    if missing or run["traffic"]["error_count"]:
        log(f"incomplete: metrics {missing}, traffic errors {run['traffic']['errors'][:3]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
