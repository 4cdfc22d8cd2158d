"""One OpenMP team in the process: the engine thread's.

torch runs its CPU ops on OpenMP, and every thread that runs a parallel op keeps a team of
worker threads of its own for as long as it lives, idle or not. libgomp lets idle workers spin
for a few milliseconds before they sleep, so the ~2,000 back-to-back parallel regions of a decode
step start at once; but while the process holds more OpenMP threads than CPUs it spins only ~100
rounds ("throttled", config/linux/wait.h), and every region then pays a futex wake-up. One
extra team is enough: the thread that loaded the model keeps one, and decoding on the engine
thread ran ~1.5x slower for it (benchmarks/README.md, "One OpenMP team").

So the thread that built an engine hands its team back with `omp_pause_resource_all` (OpenMP
5.0; libgomp frees the calling thread's pool), and so does the engine thread whenever it goes
idle (another engine in the process may be working). A team comes back by itself when its
thread runs a parallel op again.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release the threads, keep what is cheap to keep
RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU (torch on Linux), Intel, LLVM


@functools.cache
def _pause_all() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """`omp_pause_resource_all` of the OpenMP runtime torch loaded, or None."""
    if not sys.platform.startswith("linux"):
        return None
    import torch  # noqa: F401  # the runtime is torch's: loaded with it

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    for path in sorted(paths):
        if path.rsplit("/", 1)[-1].startswith(RUNTIMES) and ".so" in path:
            try:
                pause = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            pause.argtypes = [ctypes.c_int]
            pause.restype = ctypes.c_int
            return pause
    logger.info("no OpenMP runtime with omp_pause_resource_all in this process")
    return None


def release_thread_team() -> bool:
    """Hand back the calling thread's idle OpenMP workers; True when the runtime did so."""
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
