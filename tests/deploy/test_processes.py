"""Process supervision on real processes and signals: detached groups, their termination (the
grace period, SIGKILL after it, children of the leader too), pid checks and log tails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tuneserve.deploy.processes import (
    group_alive,
    log_lines,
    pid_alive,
    start_detached,
    tail_lines,
    terminate_group,
    terminate_groups,
)
from tuneserve.deploy.waiting import wait_until


def _started(log: Path) -> None:
    """Until the script has written its first line (its traps are set by then)."""
    assert wait_until(lambda: "up" in log.read_text(), timeout=10, interval=0.02)


def test_a_detached_process_leads_its_own_session_and_logs_to_its_file(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    proc = start_detached(
        ["/bin/bash", "-c", 'echo "up $GREETING"; echo oops >&2; sleep 30'],
        log=log,
        env={**os.environ, "GREETING": "hello"},
        banner="tuneserve: test",
    )
    try:
        _started(log)
        assert os.getsid(proc.pid) == proc.pid and os.getpgid(proc.pid) == proc.pid
        assert pid_alive(proc.pid) and group_alive(proc.pid)
        wait_until(lambda: "oops" in log.read_text(), timeout=5, interval=0.02)
        assert log.read_text().splitlines() == ["tuneserve: test", "up hello", "oops"]
    finally:
        terminate_group(proc.pid, grace=5)
    # our exited child is reaped by the check, not left as a zombie that looks alive
    assert not pid_alive(proc.pid) and not group_alive(proc.pid)


def test_terminate_drains_on_sigterm_and_kills_after_the_grace(tmp_path: Path) -> None:
    polite_log, stubborn_log = tmp_path / "polite.log", tmp_path / "stubborn.log"
    loop = "echo up; while :; do sleep 0.05; done"
    polite = start_detached(
        ["/bin/bash", "-c", f"trap 'echo draining; exit 0' TERM; {loop}"], log=polite_log
    )
    stubborn = start_detached(
        ["/bin/bash", "-c", f"trap 'echo ignored' TERM; {loop}"], log=stubborn_log
    )
    _started(polite_log)
    _started(stubborn_log)
    start = time.monotonic()
    terminate_groups([polite.pid, stubborn.pid], grace=1.0)
    took = time.monotonic() - start
    assert not group_alive(polite.pid) and not group_alive(stubborn.pid)
    assert 1.0 <= took < 8  # the stubborn one kept it waiting for the whole grace, then SIGKILL
    assert "draining" in polite_log.read_text() and "ignored" in stubborn_log.read_text()


def test_terminate_reaches_the_whole_group(tmp_path: Path) -> None:
    """A replica is bash running the server: the server gets the signal too."""
    log, child_pid = tmp_path / "group.log", tmp_path / "child.pid"
    leader = start_detached(
        ["/bin/bash", "-c", f"sleep 60 & echo $! > {child_pid}; echo up; wait"], log=log
    )
    _started(log)
    child = int(child_pid.read_text())
    assert os.getpgid(child) == leader.pid and pid_alive(child)
    terminate_group(leader.pid, grace=5)
    assert wait_until(lambda: not pid_alive(child), timeout=5, interval=0.05)


def test_a_pid_that_is_not_a_group_we_started_is_left_alone() -> None:
    """A stale pid in state.json may now be someone else's process: it is not signalled."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        terminate_groups([other.pid], grace=0.2)
        assert other.poll() is None and pid_alive(other.pid)
    finally:
        other.kill()
        other.wait()
    assert not pid_alive(other.pid)


def test_tail_lines(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_lines(log, 3) == ["line 997", "line 998", "line 999"]
    assert tail_lines(log, 2, end=len("line 0\nline 1\nline 2\n")) == ["line 1", "line 2"]
    assert tail_lines(log, 0) == []
    assert tail_lines(tmp_path / "missing.log", 5) == []


def test_log_lines_shows_the_tails_then_follows_every_file(tmp_path: Path) -> None:
    a, b = tmp_path / "replica-0.log", tmp_path / "replica-1.log"
    a.write_text("a1\na2\n")
    b.write_text("b1\n")
    assert list(log_lines([a], tail=5, follow=False)) == ["a1", "a2"]

    lines = log_lines([a, b], tail=1, follow=True, poll_s=0.01)
    assert [next(lines), next(lines)] == ["[replica-0] a2", "[replica-1] b1"]
    with b.open("a") as fh:
        fh.write("b2\n")
    assert next(lines) == "[replica-1] b2"
    with a.open("a") as fh:
        fh.write("a3\n")
    assert next(lines) == "[replica-0] a3"
    lines.close()  # the files are closed with the generator
