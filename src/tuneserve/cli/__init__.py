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
    from tuneserve.cli import adapters, bench, deploy, serve

    serve.register(app)
    bench.register(app)
    deploy.register(app)
    adapters.register(app)


_register()


def main() -> None:
    """Entry point: maps our errors to one line on stderr and exit code 1."""
    try:
        app()
    except TuneserveError as exc:
        if os.environ.get("TUNESERVE_DEBUG"):
            raise
        # soft_wrap: one line, whatever the width (logs, CI); messages hold paths and commands
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False
        )
        sys.exit(1)
