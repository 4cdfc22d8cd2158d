"""The `tuneserve` command: this file only wires the command modules together."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from tuneserve.errors import TuneserveError

app = typer.Typer(
    name="tuneserve",
    help="Serve a base model with LoRA adapters: an OpenAI-compatible API and a chat UI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from tuneserve.cli import bench, serve

    serve.register(app)
    bench.register(app)
    try:
        from tuneserve.cli import deploy
    except ImportError:  # the deploy commands are optional while they are being built
        return
    deploy.register(app)


_register()


def main() -> None:
    """Entry point: maps our errors to one line on stderr and exit code 1."""
    try:
        app()
    except TuneserveError as exc:
        if os.environ.get("TUNESERVE_DEBUG"):
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
