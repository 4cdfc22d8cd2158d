"""Kernels for decoding on the CPU (csrc/), compiled once on this machine.

- `linear` (csrc/gemv.c): matrix-vector products. At one to four tokens a step a Linear is
  bound by how fast its weight streams from memory, and torch's kernels leave bandwidth unused
  there: on the 2-core AVX2 machine SmolLM2's 211 Linears at one row took 25 ms through
  oneDNN's packed float32 product and 17.5 ms through torch's float16 GEMV, against 19 and 10.6
  ms here on the same weights (benchmarks/README.md, "Our own CPU kernels"). Each weight row is
  read once for all (up to MAX_ROWS) rows of x, float32, float16 (F16C) or bfloat16 (a
  shift), accumulated in float32.
- `decode_attention` (csrc/attention.c): every decode row's attention over the paged KV cache
  (float32 or bfloat16), keys and values read block by block where they lie: no gathered copy,
  no mask, one call a layer. torch's SDPA has a fixed cost that dominated at one user: 60 us a
  layer for 250 keys, against 20 here.
- `lora_delta` (csrc/lora.c): the LoRA deltas of a step whose tokens use many adapters, each
  token through its own adapter's A and B, in one call where lora.py's grouped form takes five
  torch ops a module.
- `rms_norm` and `rope` (csrc/norm_rope.c): the lean forward's RMSNorm and rotary embedding,
  one call each instead of ~7 torch ops (~45 us a norm at one token, ~60 us RoPE a layer).

Both run on torch's OpenMP threads (libgomp's soname is shared: the runtime torch loaded).
They are C, not a torch extension: gcc builds them in about a second, with no torch headers,
into the user cache (keyed by the sources, the flags and the compiler), and ctypes calls them
with the tensors' data pointers (releasing the GIL). Where they cannot be had (not x86-64 with
AVX2, no C compiler, a failed build, TUNESERVE_CPU_KERNELS=0) `load()` says why once and returns
None, and the engine keeps torch's kernels: the same arithmetic up to rounding, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import platformdirs
import torch
from torch import nn

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name
    for name in ("gemv.c", "attention.c", "norm_rope.c", "lora.c")
)
# -ffp-contract=off: a*b + c*d stays two products and a sum, as torch computes it (the kernels'
# fused multiply-adds are written out as such)
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
VERSION = 2  # what tuneserve_kernels_version() of these sources returns
MAX_ROWS = 4  # the GEMV computes 1 to 4 rows of x a call
MAX_LORA_RANK = 256  # csrc/lora.c's MAX_RANK
BUILD_TIMEOUT_S = 120  # a compiler that hangs must not hang the server's start
# the CC environment variable first, as make and setuptools do
COMPILERS = ("gcc", "cc")
DISABLE_ENV = "TUNESERVE_CPU_KERNELS"  # "0": keep torch's kernels (for comparisons)


@dataclass(frozen=True, slots=True)
class RawKernels:
    """gemv[dtype](W, x, bias, y, m, out, in, threads); rms_norm(x, x_stride, weight, y, n,
    width, eps); rope(x, x_stride, cos, sin, out, n, heads, dim): pointers as ints (None for
    no bias), strides in elements."""

    gemv: dict[torch.dtype, Any]
    rms_norm: Any
    rope: Any


class CpuKernels:
    """The loaded library (see the module docstring)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        p, n, f, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int

        def bind(name: str, *argtypes: Any, returns: Any = None) -> Any:
            function = getattr(library, name)
            function.argtypes, function.restype = list(argtypes), returns
            return function

        self._gemv = {
            dtype: bind(f"tuneserve_gemv_{suffix}", p, p, p, p, n, n, n, i)
            for dtype, suffix in (
                (torch.float32, "f32"),
                (torch.float16, "f16"),
                (torch.bfloat16, "bf16"),
            )
        }
        self._attention = {
            dtype: bind(
                f"tuneserve_decode_attention_{suffix}",
                *(p, p, p, p, n, p, n, p, n, n, n, n, n, f, i),
                returns=i,
            )
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
        }
        self._lora_delta = bind(
            "tuneserve_lora_delta_f32", p, n, p, n, p, p, p, p, n, n, n, n, i, returns=i
        )
        self._rms_norm = bind("tuneserve_rms_norm_f32", p, n, p, p, n, n, f)
        self._rope = bind("tuneserve_rope_f32", p, n, p, p, p, n, n, n)
        # the bound C functions themselves, for a caller that holds its own pointers and
        # buffers (direct_decode.py): what the methods below do, without their checks
        self.raw = RawKernels(gemv=self._gemv, rms_norm=self._rms_norm, rope=self._rope)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [m, in] float32 (m <= MAX_ROWS), weight [out, in] contiguous float32, float16 or
        bfloat16, bias [out] float32 or None -> x W^T + b: [m, out] float32."""
        m, width = x.shape
        out = weight.shape[0]
        if m > MAX_ROWS or width != weight.shape[1]:
            raise ValueError(f"gemv of x {tuple(x.shape)} by weight {tuple(weight.shape)}")
        x = x.contiguous()
        y = torch.empty((m, out), dtype=torch.float32)
        self._gemv[weight.dtype](
            weight.data_ptr(),
            x.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            m,
            out,
            width,
            torch.get_num_threads(),
        )
        return y

    @staticmethod
    def lora_fits(a: torch.Tensor) -> bool:
        """Whether `lora_delta` computes for a module's stacked A (float32, on the CPU)."""
        return a.dtype == torch.float32 and a.device.type == "cpu" and a.shape[2] <= MAX_LORA_RANK

    def lora_delta(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        rows: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        """y [N, out] += x[t] a[rows[t]] b[rows[t]] for each token t with rows[t] >= 0, in
        place (returns y): x [N, in] float32, rows of either may be strided; a [L, in, r] and
        b [L, r, out] contiguous float32 (r <= MAX_LORA_RANK); rows [N] long; order [N] long,
        the tokens sorted by row (an adapter's tokens together, on one thread)."""
        x = _rows(x)
        if y.stride(1) != 1 or not (a.is_contiguous() and b.is_contiguous()):
            raise ValueError("lora_delta needs y's rows and a, b contiguous")
        n, width = x.shape
        failed = self._lora_delta(
            x.data_ptr(),
            x.stride(0),
            y.data_ptr(),
            y.stride(0),
            a.data_ptr(),
            b.data_ptr(),
            rows.data_ptr(),
            order.data_ptr(),
            n,
            width,
            a.shape[2],
            b.shape[2],
            torch.get_num_threads(),
        )
        if failed:
            raise MemoryError("lora_delta: no memory for the token blocks")
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """HF's RMSNorm in float32: x [N, H] (rows may be strided) -> [N, H]."""
        x = _rows(x)
        y = torch.empty(x.shape, dtype=torch.float32)
        self._rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), *x.shape, eps)
        return y

    def rope(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
    ) -> torch.Tensor:
        """x * cos + roll(x, D/2) * sin per head: x [N, heads * D] (rows may be strided),
        cos/sin [N, D] contiguous (rotate_half's sign in sin) -> [N, heads, D]."""
        x = _rows(x)
        n, dim = cos.shape
        out = torch.empty((n, heads, dim), dtype=torch.float32)
        self._rope(
            x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), n, heads, dim
        )
        return out

    @staticmethod
    def attends(head_dim: int) -> bool:
        """Whether `decode_attention` computes for this head size (a float32 CPU cache)."""
        return head_dim % 8 == 0

    def decode_attention(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        blocks: torch.Tensor,
        lengths: torch.Tensor,
        *,
        block_size: int,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """query [B, H, D] float32 (one token per row); keys/values: one layer's cache pools
        [rows, KVH, D], float32 or bfloat16; blocks [B, nb] long, each row's block table;
        lengths [B] long, the keys each row sees (its last `window` ones with a sliding window)
        -> [B, H, D]."""
        rows, heads, dim = query.shape
        kv_heads = keys.shape[1]
        query = query.contiguous()
        out = torch.empty_like(query)
        failed = self._attention[keys.dtype](
            query.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            blocks.data_ptr(),
            blocks.shape[1],
            lengths.data_ptr(),
            window or 0,
            out.data_ptr(),
            rows,
            heads,
            kv_heads,
            dim,
            block_size,
            scale,
            torch.get_num_threads(),
        )
        if failed:
            raise MemoryError("decode attention: no memory for the scores")
        return out


def for_model(model: nn.Module) -> CpuKernels | None:
    """The kernels where they compute for `model` (float32, on the CPU), else None: the one
    place that decides whether an engine uses them."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return None
    return load()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as float32 [N, W] whose rows are contiguous (a slice of a wider product may stay one)."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"expected a float32 [N, W] tensor, got {x.dtype} {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _unsupported() -> str | None:
    """Why this machine cannot run the kernel, or None."""
    if os.environ.get(DISABLE_ENV) == "0":
        return f"{DISABLE_ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 and this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"it needs AVX2 and torch finds {capability} on this CPU"
    return None


def _compiler() -> str | None:
    named = os.environ.get("CC")
    for candidate in ([named] if named else []) + list(COMPILERS):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _build(compiler: str, folder: Path) -> Path:
    """The library for these sources, flags and compiler, compiled once into `folder`."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    digest = hashlib.sha256(" ".join(FLAGS).encode() + compiler.encode() + version.encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    target = folder / f"kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # a unique name, renamed into place when complete: servers starting together may both build
    handle, partial = tempfile.mkstemp(dir=folder, prefix=target.name, suffix=".part")
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", partial],
            capture_output=True,
            text=True,
            check=True,
            timeout=BUILD_TIMEOUT_S,
        )
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def kernel_dir() -> Path:
    return Path(platformdirs.user_cache_dir("tuneserve")) / "kernels"


@cache
def load() -> CpuKernels | None:
    """The kernels, built on first use; None (said once, with the reason) where it cannot be had."""
    reason = _unsupported()
    compiler = None if reason else _compiler()
    if reason is None and compiler is None:
        reason = f"no C compiler found (set CC, or install gcc: {', '.join(COMPILERS)})"
    if reason is not None or compiler is None:
        logger.info("CPU kernels not used: %s; decoding uses torch's kernels", reason)
        return None
    try:
        try:
            path = _build(compiler, kernel_dir())
        except OSError:  # an unwritable cache: a private folder for this process
            path = _build(compiler, Path(tempfile.mkdtemp(prefix="tuneserve-kernels-")))
        library = ctypes.CDLL(str(path))
        found = library.tuneserve_kernels_version()
        if found != VERSION:
            raise RuntimeError(f"{path} is version {found}, expected {VERSION}")
    except subprocess.SubprocessError as exc:  # a failed or timed-out build
        said = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        logger.warning(
            "CPU kernels not used: %s failed to build them: %s; decoding uses torch's kernels",
            compiler,
            (said or "").strip()[-500:],
        )
        return None
    except (OSError, RuntimeError) as exc:
        logger.warning("CPU kernels not used: %s; decoding uses torch's kernels", exc)
        return None
    logger.info("CPU kernels loaded from %s", path)
    return CpuKernels(library)
