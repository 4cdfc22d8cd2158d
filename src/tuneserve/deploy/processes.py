"""Detached processes and their logs: what the local provider supervises (replicas, the endpoint
proxy) outlives the CLI that started it, so a later `tuneserve stop` finds it again by pid.

Each process is started as the leader of its own session (and so of its own process group):
stopping it signals the whole group, the `/bin/bash -c` of a replica and the server it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Generator, Mapping
from pathlib import Path

import psutil

from tuneserve.deploy.waiting import wait_until

# After SIGKILL a group is gone within moments; waiting longer would only hide a kernel hang.
KILL_WAIT_S = 5.0
_TAIL_BYTES = 64 * 1024


def start_detached(
    argv: list[str],
    *,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    banner: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session with stdout and stderr appended to `log` (and `banner`,
    a first line saying what runs, written before it)."""
    with log.open("ab") as out:
        if banner is not None:
            out.write(f"{banner}\n".encode())
            out.flush()
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _reap(pid: int) -> None:
    """Collect our exited child, else it would linger as a zombie that looks alive."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie counts as gone)."""
    _reap(pid)
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (the leader may have exited before the
    server it started)."""
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leads_own_session(pid: int) -> bool:
    """Whether `pid` leads its own session, as every process we start does (else the pid was
    reused by a process that is not ours)."""
    try:
        return os.getsid(pid) == pid
    except ProcessLookupError:
        return True  # a zombie leader of a live group: still ours to signal


def _signal_groups(pgids: list[int], sig: signal.Signals) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)


def terminate_groups(pids: list[int], grace: float) -> None:
    """SIGTERM the process groups led by `pids` (ones we started), SIGKILL what is left after
    `grace` seconds. All groups drain at the same time, as the platforms stop replicas."""
    ours = [pid for pid in pids if group_alive(pid) and _leads_own_session(pid)]
    if not ours:
        return

    def all_gone() -> bool:
        return not any(group_alive(pid) for pid in ours)

    _signal_groups(ours, signal.SIGTERM)
    if wait_until(all_gone, timeout=grace, interval=0.1):
        return
    _signal_groups(ours, signal.SIGKILL)
    wait_until(all_gone, timeout=KILL_WAIT_S, interval=0.05)


def terminate_group(pid: int, grace: float) -> None:
    terminate_groups([pid], grace)


def tail_lines(path: Path, n: int, *, end: int | None = None) -> list[str]:
    """The last `n` lines of a text file (of its first `end` bytes when given); [] when the
    file does not exist."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END) if end is None else end
            fh.seek(max(0, size - _TAIL_BYTES))
            data = fh.read(size - fh.tell()).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return data.splitlines()[-n:] if n > 0 else []


def log_lines(
    files: list[Path], *, tail: int, follow: bool, poll_s: float = 0.25
) -> Generator[str, None, None]:
    """The last `tail` lines of each file, then (following) the lines appended to any of them
    as they come, for ever. Lines carry `[file stem] ` when there are several files."""

    def prefix(path: Path) -> str:
        return f"[{path.stem}] " if len(files) > 1 else ""

    # each file's end is taken before its tail is read: a line written in between is followed,
    # not lost
    with contextlib.ExitStack() as stack:
        handles = [
            (path, stack.enter_context(path.open("r", encoding="utf-8", errors="replace")))
            for path in files
        ]
        for path, fh in handles:
            end = fh.seek(0, os.SEEK_END)
            yield from (prefix(path) + line for line in tail_lines(path, tail, end=end))
        while follow:
            new = [(path, line) for path, fh in handles for line in iter(fh.readline, "")]
            yield from (prefix(path) + line.rstrip("\n") for path, line in new)
            if not new:
                time.sleep(poll_s)
