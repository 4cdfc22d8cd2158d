"""Files replaced in one rename: a reader (a replica, the proxy, a hard-linked revision snapshot,
a second CLI) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# what a plain open() would create: mkstemp's 0600 is only right for secrets (pass mode=0o600)
_UMASK = os.umask(0)
os.umask(_UMASK)
DEFAULT_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def replacing(dest: Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A new file that takes the place of `dest` when the block ends (and is removed when the
    block fails). It is hidden beside `dest` meanwhile, so scans of the folder skip it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.chmod(tmp, DEFAULT_MODE if mode is None else mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(dest: Path, data: str | bytes, *, mode: int | None = None) -> None:
    with replacing(dest, mode=mode) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
