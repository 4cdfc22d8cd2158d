"""`tuneserve bench`: run the benchmark harness of a tuneserve checkout (`python -m benchmarks`).

The harness lives in the repository's `benchmarks/` folder, not in the installed package (it
starts peers, builds a bench model and draws plots: nothing a server needs). This command finds
that folder, beside the package for an editable install or in the working directory, and runs
`python -m benchmarks ARGS...` there with this Python, passing every argument through.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from tuneserve.cli._common import examples
from tuneserve.errors import TuneserveError

EXAMPLES = examples(
    "tuneserve bench --quick                      # about 3 minutes: C in {1,8}, K in {1,8}",
    "tuneserve bench                              # the full protocol (benchmarks/README.md)",
    "tuneserve bench --systems tuneserve,ceiling --concurrency 32 --adapters 1,32",
    "tuneserve bench --help                       # every option of the harness",
)


class HarnessNotFound(TuneserveError):
    pass


def register(app: typer.Typer) -> None:
    app.command(
        help="Measure tuneserve against its peers (runs `python -m benchmarks`)." + EXAMPLES,
        short_help="Measure tuneserve against its peers (see benchmarks/README.md).",
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "help_option_names": [],
        },
        add_help_option=False,
    )(bench)


def bench(ctx: typer.Context) -> None:
    root = find_checkout()
    code = subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], cwd=root)
    raise typer.Exit(code)


def find_checkout() -> Path:
    """The repository root holding benchmarks/__main__.py."""
    here = Path(__file__).resolve()
    candidates = [here.parents[3], Path.cwd(), *Path.cwd().parents]  # src/tuneserve/cli/bench.py
    for root in candidates:
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    raise HarnessNotFound(
        "`tuneserve bench` runs the harness in a tuneserve checkout's benchmarks/ folder, and "
        f"found none beside {here.parents[1]} nor in {Path.cwd()} or above it. Run it from a "
        "clone of the tuneserve repository (or run `python -m benchmarks` in its root)."
    )
