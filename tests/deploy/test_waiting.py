"""wait_until: the one polling loop of deploy/."""

from __future__ import annotations

import time

import pytest

from tuneserve.deploy.waiting import wait_until


def test_returns_the_first_truthy_result() -> None:
    results = iter([None, 0, "", "ready", "later"])
    calls: list[float] = []

    def check() -> object:
        calls.append(time.monotonic())
        return next(results)

    assert wait_until(check, timeout=5, interval=0.01) == "ready"
    assert len(calls) == 4


def test_gives_none_at_the_deadline_after_checking_once_more_there() -> None:
    calls: list[float] = []
    waits: list[float] = []
    start = time.monotonic()

    def check() -> bool:
        calls.append(time.monotonic() - start)
        return False

    assert wait_until(check, timeout=0.3, interval=0.2, on_wait=waits.append) is None
    took = time.monotonic() - start
    assert 0.3 <= took < 1.5
    # at 0, after one interval, and at the deadline (the last sleep is cut to what is left)
    assert len(calls) == 3 and calls[-1] >= 0.3
    assert len(waits) == 2 and waits == sorted(waits) and waits[0] < 0.1


def test_checks_once_even_with_no_time() -> None:
    calls: list[str] = []

    def check(answer: str) -> str:
        calls.append(answer)
        return answer

    assert wait_until(lambda: check("now"), timeout=0, interval=1) == "now"
    assert wait_until(lambda: check(""), timeout=0, interval=1) is None
    assert calls == ["now", ""]


def test_a_check_raising_ends_the_wait() -> None:
    class Gone(Exception):
        pass

    def check() -> bool:
        raise Gone("the process exited")

    start = time.monotonic()
    with pytest.raises(Gone, match="exited"):
        wait_until(check, timeout=30, interval=1)
    assert time.monotonic() - start < 1
