"""Polling with a deadline: the one loop behind every wait of deploy/ (replicas ready, a proxy
listening, a process group gone, a revision healthy)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float,
    interval: float,
    on_wait: Callable[[float], None] | None = None,
) -> T | None:
    """Call `check` until it returns something truthy, and return that; None once `timeout`
    seconds have passed. `check` always runs at least once, and once more at the deadline, so a
    short timeout still sees a state that came about during the last sleep. `on_wait(elapsed)`
    runs before each sleep (a spinner's text). To stop early on a failure, raise from `check`."""
    start = time.monotonic()
    while True:
        result = check()
        if result:
            return result
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return None
        if on_wait is not None:
            on_wait(elapsed)
        time.sleep(min(interval, max(0.0, timeout - elapsed)))
