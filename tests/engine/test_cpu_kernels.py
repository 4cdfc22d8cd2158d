"""The CPU kernels (engine/csrc/): built with this machine's compiler, the GEMV computes what
F.linear computes (every row count it takes, odd widths, every weight type), the decode
attention what a plain softmax loop computes over paged keys, the LoRA delta what lora.py's
reference loop computes; where they cannot be built the engine is told why and keeps torch's
kernels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuneserve.engine import cpu_kernels

KERNELS = cpu_kernels.load()
needs_kernel = pytest.mark.skipif(KERNELS is None, reason="no AVX2 or no C compiler here")


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
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"]
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_the_kernel_equals_f_linear(
    rows: int, out: int, width: int, dtype: torch.dtype, with_bias: bool
) -> None:
    assert KERNELS is not None
    torch.manual_seed(rows * 1000 + out)
    weight = torch.randn(out, width).to(dtype)
    bias = torch.randn(out) if with_bias else None
    x = torch.randn(rows, width)
    got = KERNELS.linear(x, weight, bias)
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * width**0.5)


@needs_kernel
def test_a_row_does_not_depend_on_the_rows_beside_it() -> None:
    """Batch invariance: a user's tokens are the same whether others decode with it."""
    assert KERNELS is not None
    torch.manual_seed(7)
    weight, x = torch.randn(300, 576), torch.randn(4, 576)
    alone = KERNELS.linear(x[:1], weight, None)
    for rows in (2, 3, 4):
        assert torch.equal(KERNELS.linear(x[:rows], weight, None)[:1], alone)


@needs_kernel
def test_more_rows_than_it_takes_are_refused() -> None:
    assert KERNELS is not None
    with pytest.raises(ValueError, match="gemv of x"):
        KERNELS.linear(torch.randn(cpu_kernels.MAX_ROWS + 1, 8), torch.randn(4, 8), None)


@needs_kernel
@pytest.mark.parametrize(
    ("rank", "out"),
    [
        pytest.param(16, 576, id="r16-smollm2-q"),
        pytest.param(12, 100, id="r12-tails"),  # a rank and a width off the vector sizes
        pytest.param(40, 192, id="r40-two-passes"),  # h in two passes of up to 32 columns
    ],
)
def test_lora_delta_equals_the_reference_loop(rank: int, out: int) -> None:
    """Tokens on different adapters (and on none), y a strided slice of a wider product, any
    order of the tokens: the same result bit for bit, the reference's up to rounding."""
    from tuneserve.engine.lora import lora_reference

    assert KERNELS is not None
    torch.manual_seed(rank + out)
    width, stack = 70, 3
    weights = [(torch.randn(rank, width), torch.randn(out, rank)) for _ in range(stack)]
    a = torch.stack([w[0].T for w in weights]).contiguous()  # [L, in, r]
    b = torch.stack([w[1].T for w in weights]).contiguous()  # [L, r, out]
    token_slots = [2, -1, 0, 1, 2, 0, -1, 1, 2]
    x = torch.randn(len(token_slots), width)
    wide = torch.randn(len(token_slots), out + 9)
    y = wide[:, 5 : 5 + out]  # one projection's columns of a fused product
    before, left, right = y.clone(), wide[:, :5].clone(), wide[:, 5 + out :].clone()
    rows = torch.tensor(token_slots)
    KERNELS.lora_delta(y, x, a, b, rows, torch.argsort(rows, stable=True))
    want = before.double() + lora_reference(x.double(), token_slots, [
        (w[0].double(), w[1].double()) for w in weights
    ])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(wide[:, :5], left) and torch.equal(wide[:, 5 + out :], right)
    assert torch.equal(y[1], before[1]) and torch.equal(y[6], before[6])  # tokens on no adapter
    again = before.clone()
    KERNELS.lora_delta(again, x, a, b, rows, torch.arange(len(token_slots)).flip(0))
    assert torch.equal(again, y)


def _plain_attention(q, keys, values, table, length, window, block_size):
    """One row in float64: q [H, D]; positions 0..length-1 at rows table[p // bs] * bs + p % bs."""
    first = max(0, length - window) if window else 0
    rows = [table[p // block_size] * block_size + p % block_size for p in range(first, length)]
    k, v = keys[rows].double(), values[rows].double()  # [L, KVH, D]
    groups = q.shape[0] // keys.shape[1]
    out = []
    for h in range(q.shape[0]):
        weights = (k[:, h // groups] @ q[h].double() * q.shape[-1] ** -0.5).softmax(0)  # [L]
        out.append(weights @ v[:, h // groups])
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [
        pytest.param(9, 3, 64, id="smollm2"),
        pytest.param(4, 4, 128, id="no-grouping-128"),
        pytest.param(10, 2, 40, id="five-per-kv-head-40"),
        pytest.param(8, 2, 32, id="four-per-kv-head-32"),
        pytest.param(14, 2, 64, id="seven-per-kv-head"),
    ],
)
@pytest.mark.parametrize("window", [None, 5], ids=["full", "sliding-5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_attention_equals_a_softmax_loop(
    heads: int, kv_heads: int, dim: int, window: int | None, dtype: torch.dtype
) -> None:
    """Keys and values float32, or bfloat16 (the loop reads the same bfloat16 values)."""
    assert KERNELS is not None
    torch.manual_seed(heads + dim)
    block_size, num_blocks = 4, 24
    keys = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    values = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    # rows of different lengths on scattered blocks; the table is padded with block 0
    lengths = [1, 7, 17, 4]
    tables = [[9], [3, 20], [5, 1, 14, 2, 22], [11]]
    width = max(map(len, tables))
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lengths), heads, dim)
    got = KERNELS.decode_attention(
        q,
        keys,
        values,
        blocks,
        torch.tensor(lengths),
        block_size=block_size,
        window=window,
        scale=dim**-0.5,
    )
    for b, length in enumerate(lengths):
        want = _plain_attention(q[b], keys, values, tables[b], length, window, block_size)
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rope_is_hf_arithmetic_bit_for_bit() -> None:
    """x * cos + rotate_half(x) * sin, on rows that are a slice of a wider product."""
    assert KERNELS is not None
    torch.manual_seed(11)
    n, heads, dim = 5, 3, 64
    wide = torch.randn(n, heads * dim + 40)  # q's columns of a fused q/k/v product
    x = wide[:, : heads * dim]
    cos, sin = torch.randn(n, dim), torch.randn(n, dim)
    half = dim // 2
    rotated = torch.cat([-x.view(n, heads, dim)[..., half:], x.view(n, heads, dim)[..., :half]], -1)
    want = x.view(n, heads, dim) * cos[:, None] + rotated * sin[:, None]
    sign = torch.cat([torch.full((half,), -1.0), torch.ones(half)])
    got = KERNELS.rope(x, cos, sin * sign, heads)
    assert torch.equal(got, want)


@needs_kernel
def test_rms_norm_equals_hf_rmsnorm() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert KERNELS is not None
    torch.manual_seed(12)
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 576) * 3
    with torch.inference_mode():
        want = norm(x)
        got = KERNELS.rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        KERNELS.rms_norm(x.double(), norm.weight, 1e-5)


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """load() as on a new machine: nothing cached, kernels built into tmp_path."""
    monkeypatch.setattr(cpu_kernels, "kernel_dir", lambda: tmp_path)
    cpu_kernels.load.cache_clear()
    yield cpu_kernels.load
    cpu_kernels.load.cache_clear()


@needs_kernel
def test_it_is_built_once_into_the_cache(fresh_load, tmp_path: Path) -> None:
    assert fresh_load() is not None
    built = list(tmp_path.glob("kernels-*.so"))
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
    broken.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc: out of cheese' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "failed to build them" in caplog.text and "out of cheese" in caplog.text
    assert not list(tmp_path.glob("kernels-*"))  # no half-written library left behind


@needs_kernel
def test_a_compiler_that_hangs_is_given_up_on(
    fresh_load, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hanging = tmp_path / "hanging-cc"
    hanging.write_text('#!/bin/sh\n[ "$1" = --version ] && exit 0\nexec sleep 30\n')
    hanging.chmod(0o755)
    monkeypatch.setenv("CC", str(hanging))
    monkeypatch.setattr(cpu_kernels, "BUILD_TIMEOUT_S", 1)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "failed to build them" in caplog.text and "timed out" in caplog.text
    assert not list(tmp_path.glob("kernels-*"))


def test_no_compiler_or_disabled_says_why(
    fresh_load, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert f"{cpu_kernels.DISABLE_ENV}=0" in caplog.text
    monkeypatch.delenv(cpu_kernels.DISABLE_ENV)
    fresh_load.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", "")
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "no C compiler found" in caplog.text or "needs AVX2" in caplog.text
