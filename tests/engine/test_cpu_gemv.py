"""The decode GEMV (engine/csrc/gemv.c): built with this machine's compiler, it computes what
F.linear computes, for every row count it takes, odd widths and both weight types; where it
cannot be built the engine is told why and keeps torch's kernels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuneserve.engine import cpu_gemv

GEMV = cpu_gemv.load()
needs_kernel = pytest.mark.skipif(GEMV is None, reason="no AVX2 or no C compiler here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("out", "width"),
    [
        pytest.param(960, 576, id="smollm2-qkv"),
        pytest.param(5, 37, id="odd-tail"),
        pytest.param(3, 16, id="fewer-outputs-than-threads"),
        pytest.param(33, 7, id="narrower-than-a-vector"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_the_kernel_equals_f_linear(
    rows: int, out: int, width: int, dtype: torch.dtype, with_bias: bool
) -> None:
    assert GEMV is not None
    torch.manual_seed(rows * 1000 + out)
    weight = torch.randn(out, width).to(dtype)
    bias = torch.randn(out) if with_bias else None
    x = torch.randn(rows, width)
    got = GEMV.linear(x, weight, bias)
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * width**0.5)


@needs_kernel
def test_a_row_does_not_depend_on_the_rows_beside_it() -> None:
    """Batch invariance: a user's tokens are the same whether others decode with it."""
    assert GEMV is not None
    torch.manual_seed(7)
    weight, x = torch.randn(300, 576), torch.randn(4, 576)
    alone = GEMV.linear(x[:1], weight, None)
    for rows in (2, 3, 4):
        assert torch.equal(GEMV.linear(x[:rows], weight, None)[:1], alone)


@needs_kernel
def test_more_rows_than_it_takes_are_refused() -> None:
    assert GEMV is not None
    with pytest.raises(ValueError, match="gemv of x"):
        GEMV.linear(torch.randn(cpu_gemv.MAX_ROWS + 1, 8), torch.randn(4, 8), None)


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """load() as on a new machine: nothing cached, kernels built into tmp_path."""
    monkeypatch.setattr(cpu_gemv, "kernel_dir", lambda: tmp_path)
    cpu_gemv.load.cache_clear()
    yield cpu_gemv.load
    cpu_gemv.load.cache_clear()


@needs_kernel
def test_it_is_built_once_into_the_cache(fresh_load, tmp_path: Path) -> None:
    assert fresh_load() is not None
    built = list(tmp_path.glob("gemv-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.part"))
    first = built[0].stat().st_mtime_ns
    fresh_load.cache_clear()
    assert fresh_load() is not None
    assert built[0].stat().st_mtime_ns == first  # reused, not rebuilt


@needs_kernel
def test_a_compiler_that_fails_leaves_torch_kernels(
    fresh_load, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc: out of cheese' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger=cpu_gemv.__name__):
        assert fresh_load() is None
    assert "failed to build it" in caplog.text and "out of cheese" in caplog.text
    assert not list(tmp_path.glob("gemv-*"))  # no half-written library left behind


def test_no_compiler_or_disabled_says_why(
    fresh_load, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(cpu_gemv.DISABLE_ENV, "0")
    with caplog.at_level(logging.INFO, logger=cpu_gemv.__name__):
        assert fresh_load() is None
    assert f"{cpu_gemv.DISABLE_ENV}=0" in caplog.text
    monkeypatch.delenv(cpu_gemv.DISABLE_ENV)
    fresh_load.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", "")
    with caplog.at_level(logging.INFO, logger=cpu_gemv.__name__):
        assert fresh_load() is None
    assert "no C compiler found" in caplog.text or "needs AVX2" in caplog.text
