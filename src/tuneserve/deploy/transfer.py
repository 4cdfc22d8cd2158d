"""Copying bytes with a progress bar: the one bar of deploy's sync and of `tuneserve adapters`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

Advance = Callable[[int], None]  # told how many more bytes were moved
CHUNK = 1 << 20


def copy_chunks(src: Path, out: BinaryIO, advance: Advance) -> None:
    with src.open("rb") as inp:
        while chunk := inp.read(CHUNK):
            out.write(chunk)
            advance(len(chunk))


class Transfer:
    """One bar: bytes moved so far, and what is being moved."""

    def __init__(self, progress: Progress, task: TaskID, title: str) -> None:
        self._progress, self._task, self._title = progress, task, title

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def moving(self, what: str) -> None:
        self._progress.update(self._task, description=f"{self._title} {escape(what)}")


@contextlib.contextmanager
def transfer_progress(
    console: Console, total: int, title: str, *, show: bool = True
) -> Iterator[Transfer]:
    """A transient bar of `total` bytes, shown only on a terminal (and when `show`)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal or not show,
        transient=True,
    ) as progress:
        task = progress.add_task(title, total=total or 1)
        yield Transfer(progress, task, title)
