"""What the command modules share: the two consoles and option definitions used by several
commands (as huggingface_hub's `_cli_utils.py`)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

# Results on stdout; progress, notes and hints on stderr. soft_wrap: one line per message,
# whatever the width (logs, CI); they hold paths and commands.
stdout = Console(highlight=False, soft_wrap=True, markup=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def workspace_option(help: str) -> Any:
    """`--workspace/-w` (or TUNESERVE_WORKSPACE), with what the workspace means to a command."""
    return typer.Option("--workspace", "-w", envvar="TUNESERVE_WORKSPACE", help=help)


def examples(*lines: str) -> str:
    """The examples block that ends a command's --help, one command line each."""
    return "\n\nExamples:\n\n" + "\n\n".join(f"  {line}" for line in lines)
