"""One benchmark run: build the bench model, then for each system, each K, each C, measure a point.

Every HTTP system is started once per K (with exactly K adapters, max batch size = the largest
C) and serves the C points in increasing order after a short untimed warm-up. Request i of a
point gets its own prompt (unique across points, so no system can reuse a cached prefix) and an
adapter drawn uniformly from the K by a generator seeded with (seed, K, C): every system sees
the same requests in the same order.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.client import PointRun, run_closed_loop
from benchmarks.model import SIZES, BenchModel, ensure_bench_model
from benchmarks.procs import RssSampler, ServerProcess, StartError, free_port, tail
from benchmarks.results import BenchConfig, Point, Results, SystemRun, machine_info, now_iso
from benchmarks.systems import REPO, HttpSystem, http_system

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def prompt_index(k: int, c: int, i: int) -> int:
    return (k * 1000 + c) * 100_000 + i


def summarize(system: str, k: int, c: int, cfg: BenchConfig, run: PointRun,
              peak_rss_mb: float) -> Point:
    ok = [r for r in run.results if r.ok]
    errors = [r.error or "unknown error" for r in run.results if not r.ok]
    point = Point(system=system, adapters=k, concurrency=c, requests=len(run.results),
                  requests_ok=len(ok), prompt_tokens=cfg.prompt_len, max_tokens=cfg.max_tokens,
                  errors=errors[:5])
    if not ok:
        point.status, point.reason = "failed", f"all {len(run.results)} requests failed"
        return point
    if errors:
        point.reason = f"{len(errors)} of {len(run.results)} requests failed"
    point.completion_tokens = sum(r.completion_tokens for r in ok)
    point.wall_s = run.wall_s
    point.output_tokens_per_s = point.completion_tokens / run.wall_s
    ttfts = [r.ttft_s for r in ok]
    point.ttft_p50_ms = _ms(percentile(ttfts, 50))
    point.ttft_p99_ms = _ms(percentile(ttfts, 99))
    point.itl_p50_ms = _ms(percentile([g for r in ok for g in r.itl_s], 50))
    point.tpot_p50_ms = _ms(percentile([r.tpot_s for r in ok], 50))
    point.latency_p50_ms = _ms(percentile([r.latency_s for r in ok], 50))
    point.peak_rss_mb = peak_rss_mb
    point.client_cpu_pct = round(100 * run.client_cpu_s / run.wall_s, 1)
    short = [r.completion_tokens for r in ok if r.completion_tokens != cfg.max_tokens]
    if short:
        note = (f"{len(short)} requests made other than {cfg.max_tokens} tokens "
                f"(e.g. {short[0]})")
        point.reason = f"{point.reason}; {note}" if point.reason else note
    return point


def describe(p: Point) -> str:
    if p.status != "ok":
        return f"{p.status}: {p.reason}"
    return (f"{p.output_tokens_per_s:8.1f} tok/s  ttft p50 {p.ttft_p50_ms:7.1f} ms  "
            f"p99 {p.ttft_p99_ms:7.1f} ms  itl p50 {p.itl_p50_ms or 0:6.1f} ms  "
            f"rss {p.peak_rss_mb:6.0f} MB  client cpu {p.client_cpu_pct or 0:4.0f}%"
            + (f"  ({p.reason})" if p.reason else ""))


def run_http_system(system: HttpSystem, bench: BenchModel, cfg: BenchConfig, out_dir: Path,
                    log: Log) -> tuple[SystemRun, list[Point]]:
    run = SystemRun(system=system.name, description=system.description)
    points: list[Point] = []
    for k in cfg.adapters:
        why = system.unsupported(k)
        if why:
            points += [Point(system=system.name, adapters=k, concurrency=c, status="skipped",
                             reason=why) for c in cfg.concurrency]
            log(f"[{system.name} K={k}] skipped: {why}")
            continue
        port = free_port()
        try:  # a peer may prepare its files here (llama.cpp converts the weights)
            launch = system.launch(bench, k, cfg, port)
        except StartError as exc:
            reason = f"server could not be prepared: {exc}"
            log(f"[{system.name} K={k}] {reason}")
            points += [Point(system=system.name, adapters=k, concurrency=c, status="failed",
                             reason=reason) for c in cfg.concurrency]
            continue
        run.commands.append(" ".join(launch.argv))
        base_url = f"http://127.0.0.1:{port}"
        log_path = out_dir / "logs" / f"{system.name}-K{k}.log"
        server = ServerProcess(launch.argv, log_path, base_url + launch.ready_path,
                               env=launch.env, cwd=REPO)
        with server:
            started = time.perf_counter()
            try:
                server.start(cfg.startup_timeout_s)
                names = bench.adapter_names(k)
                url = base_url + "/v1/completions"
                # every adapter once at least: llama-server loads them all at its start,
                # tuneserve on first use; a point measures serving, not first loads
                warm_count = max(cfg.warmup_requests, len(names)) if cfg.warmup_requests else 0
                warm_prompts = [bench.prompt_text(10**12 + j, cfg.prompt_len, cfg.seed)
                                for j in range(warm_count)]

                def warm_body(j: int, names: list[str] = names,
                              texts: list[str] = warm_prompts) -> dict[str, Any]:
                    return system.body(texts[j], names[j % len(names)], cfg, 8)

                warm = run_closed_loop(
                    url, warm_body,
                    warm_count, 1, cfg.request_timeout_s) if warm_count else None
                if warm and not any(r.ok for r in warm.results):
                    raise StartError(f"warm-up failed: {warm.results[0].error}; log {log_path}:\n"
                                     f"{tail(log_path)}")
            except StartError as exc:
                reason = f"server did not start: {exc}"
                log(f"[{system.name} K={k}] {reason}")
                points += [Point(system=system.name, adapters=k, concurrency=c, status="failed",
                                 reason=reason) for c in cfg.concurrency]
                continue
            log(f"[{system.name} K={k}] ready in {time.perf_counter() - started:.1f} s")
            with RssSampler(server.pid) as rss:
                for c in cfg.concurrency:
                    rss.reset()
                    point = measure(system, bench, cfg, url, k, c, rss)
                    log(f"[{system.name} K={k} C={c}] {describe(point)}")
                    if point.status != "ok":
                        point.errors.append(f"log tail: {tail(log_path, 5)}")
                    points.append(point)
    return _finish(run, points), points


def measure(system: HttpSystem, bench: BenchModel, cfg: BenchConfig, url: str, k: int, c: int,
            rss: RssSampler) -> Point:
    names = bench.adapter_names(k)
    rng = random.Random(f"{cfg.seed}-{k}-{c}")
    picks = [names[rng.randrange(len(names))] for _ in range(cfg.requests)]

    # made before the clock starts: real-text prompts take a few ms each to fit to length
    prompts = [bench.prompt_text(prompt_index(k, c, i), cfg.prompt_len, cfg.seed)
               for i in range(cfg.requests)]

    def body_for(i: int) -> dict[str, Any]:
        return system.body(prompts[i], picks[i], cfg, cfg.max_tokens)

    stagger = cfg.max_tokens if cfg.arrivals == "staggered" else None
    result = run_closed_loop(url, body_for, cfg.requests, c, cfg.request_timeout_s, stagger)
    return summarize(system.name, k, c, cfg, result, rss.peak_mb)


def run_ceiling(bench: BenchModel, cfg: BenchConfig, out_dir: Path,
                log: Log) -> tuple[SystemRun, list[Point]]:
    argv = [sys.executable, "-m", "benchmarks.peers.ceiling", "--base", str(bench.base),
            "--concurrency", ",".join(map(str, cfg.concurrency)), "--requests", str(cfg.requests),
            "--prompt-len", str(cfg.prompt_len), "--max-tokens", str(cfg.max_tokens),
            "--size", cfg.size]
    run = SystemRun(system="ceiling", commands=[" ".join(argv)],
                    description="the bare model's forward in a loop at batch C, HF DynamicCache, "
                                "argmax, no HTTP, no LoRA")
    points: list[Point] = []
    log_path = out_dir / "logs" / "ceiling.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            data = json.loads(line)
            if "concurrency" not in data:
                continue
            points.append(_ceiling_point(data, cfg))
            log(f"[ceiling C={data['concurrency']}] {describe(points[-1])}")
        proc.wait()
    done = {p.concurrency for p in points}
    for c in cfg.concurrency:
        if c not in done:
            points.append(Point(system="ceiling", adapters=0, concurrency=c, status="failed",
                                reason=f"exit code {proc.returncode}: {tail(log_path, 8)}"))
    return _finish(run, points), points


def _ceiling_point(data: dict[str, Any], cfg: BenchConfig) -> Point:
    ttft, itl, latencies = data["ttft_s"], data["itl_s"], data["latency_s"]
    return Point(
        system="ceiling", adapters=0, concurrency=data["concurrency"],
        requests=data["requests"], requests_ok=data["requests"], prompt_tokens=cfg.prompt_len,
        max_tokens=cfg.max_tokens, completion_tokens=data["completion_tokens"],
        wall_s=data["wall_s"], output_tokens_per_s=data["completion_tokens"] / data["wall_s"],
        ttft_p50_ms=_ms(percentile(ttft, 50)), ttft_p99_ms=_ms(percentile(ttft, 99)),
        itl_p50_ms=_ms(percentile(itl, 50)), tpot_p50_ms=_ms(percentile(itl, 50)),
        latency_p50_ms=_ms(percentile(latencies, 50)), peak_rss_mb=data["peak_rss_mb"],
    )


def _finish(run: SystemRun, points: list[Point]) -> SystemRun:
    statuses = {p.status for p in points}
    skipped = sorted({p.reason or "" for p in points if p.status == "skipped"})
    if statuses == {"skipped"}:
        run.status, run.reason = "skipped", "; ".join(skipped)
    elif "failed" not in statuses:
        run.status = "ok"
        run.reason = ("some points skipped: " + "; ".join(skipped)) if skipped else None
    elif "ok" in statuses:
        run.status = "partial"
        run.reason = "; ".join(sorted({p.reason or "" for p in points if p.status == "failed"}))
    else:
        run.status = "failed"
        run.reason = next((p.reason for p in points if p.status == "failed"), None)
    return run


def run_benchmark(cfg: BenchConfig, out_dir: Path, cache_dir: Path, command: str,
                  log: Log = stderr_log) -> Results:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"Building/reusing the {cfg.size} bench model and {max(cfg.adapters)} adapters "
        f"in {cache_dir} ...")
    bench = ensure_bench_model(cache_dir, cfg.size, max(cfg.adapters))
    spec = SIZES[cfg.size]
    results = Results(
        date=now_iso(), command=command, machine=machine_info(), config=cfg,
        model={"size": cfg.size, "path": str(bench.root), **spec.__dict__},
    )
    for name in cfg.systems:
        if name == "ceiling":
            run, points = run_ceiling(bench, cfg, out_dir, log)
        else:
            run, points = run_http_system(http_system(name, cfg), bench, cfg, out_dir, log)
        results.systems.append(run)
        results.points += points
        results.write(out_dir / "results.json")  # keep what is done if a later system hangs

    from benchmarks.report import compute_targets

    results.targets = compute_targets(results)
    results.duration_s = time.perf_counter() - started
    results.machine["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results.write(out_dir / "results.json")
    return results
