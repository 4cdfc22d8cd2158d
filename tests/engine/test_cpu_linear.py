"""Packed and fused CPU Linears compute what the nn.Linears they replace computed."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from tuneserve.engine import cpu_kernels, cpu_linear
from tuneserve.engine.cpu_linear import (
    HALF_MAX_ROWS,
    FusedMember,
    PackedLinear,
    can_pack,
    pack_linears,
)

KERNELS = cpu_kernels.load()  # what an engine on this machine gets (None: torch's kernels)

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN"
)


class Block(nn.Module):
    """The shapes of a decoder layer: q/k/v (with bias, as Qwen2), o, gate/up, down."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(32, n) for n in (32, 16, 16))
        self.o_proj = nn.Linear(32, 32, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(32, 48, bias=False), nn.Linear(32, 48, bias=False)
        self.down_proj = nn.Linear(48, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        h = self.o_proj(q + torch.cat([k, v], -1))
        return self.down_proj(self.gate_proj(h) * self.up_proj(h))


def test_packed_and_fused_layers_equal_the_originals() -> None:
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(3, 5, 32)  # [batch, tokens, hidden]: leading dims are kept
    with torch.inference_mode():
        expected = block(x)
        assert can_pack(block)
        # q/k/v and gate/up fused; o and down packed
        assert pack_linears(block, kernels=KERNELS) == (2, 2)
        got = block(x)
    assert isinstance(block.q_proj, FusedMember) and isinstance(block.o_proj, PackedLinear)
    # the layers still read as the Linears they were (adapter checks and LoRA wrapping)
    assert isinstance(block.k_proj, nn.Linear)
    assert (block.k_proj.in_features, block.k_proj.out_features) == (32, 16)
    assert block.k_proj.weight.shape == (16, 32) and block.k_proj.bias is not None
    assert block.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_member_called_on_a_new_input_never_gets_a_stale_slice() -> None:
    torch.manual_seed(1)
    block = Block().eval()
    a, b = torch.randn(4, 32), torch.randn(4, 32)
    with torch.inference_mode():
        want_q_a, want_k_b = block.q_proj(a), block.k_proj(b)
        pack_linears(block, kernels=KERNELS)
        got_q_a = block.q_proj(a)  # computes the group's product for a
        got_k_b = block.k_proj(b)  # b is another tensor: computed again, not a's slice
    torch.testing.assert_close(got_q_a, want_q_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k_b, want_k_b, rtol=1e-5, atol=1e-5)


def test_only_float32_cpu_models_are_packed() -> None:
    assert not can_pack(Block().to(torch.bfloat16))


def test_projections_inside_lora_wrappers_are_fused_too() -> None:
    from tuneserve.engine.lora import BatchedLoRALinear, LoRABatch

    torch.manual_seed(2)
    block = Block().eval()
    block.q_proj = BatchedLoRALinear(block.q_proj, 1, LoRABatch())  # type: ignore[assignment]
    x = torch.randn(2, 7, 32)
    with torch.inference_mode():
        expected = block(x)
        assert pack_linears(block, kernels=KERNELS) == (2, 2)
        got = block(x)
    assert isinstance(block.q_proj, BatchedLoRALinear)
    assert isinstance(block.q_proj.base_layer, FusedMember)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _half_packed_o_proj(
    seed: int, kernels: cpu_kernels.CpuKernels | None = KERNELS
) -> tuple[PackedLinear, torch.Tensor]:
    """A Block's o_proj packed with float16 copies, and its original float32 weight."""
    torch.manual_seed(seed)
    block = Block().eval()
    o_weight = block.o_proj.weight.detach().clone()
    with torch.inference_mode():
        pack_linears(block, half=True, kernels=kernels)
    assert isinstance(block.o_proj, PackedLinear) and block.o_proj.plan is not None
    return block.o_proj, o_weight


def test_float16_copies_serve_steps_of_few_tokens_and_float32_the_rest() -> None:
    o, o_weight = _half_packed_o_proj(3)
    assert o.plan is not None and o.decode_weight is not None
    assert o.decode_weight.dtype == torch.float16 and o.decode_weight.shape == (32, 32)
    rows = o.plan.max_rows  # 4 through our GEMV, 2 through torch's float16 GEMV
    assert rows == (cpu_kernels.MAX_ROWS if KERNELS else HALF_MAX_ROWS)
    small, large = torch.randn(rows, 32), torch.randn(rows + 1, 32)
    with torch.inference_mode():
        # a small step is float16's product (accumulated in float32), not float32's
        half_product = torch.nn.functional.linear(small, o_weight.half().float())
        got_small, want_small = o(small), torch.nn.functional.linear(small, o_weight)
        torch.testing.assert_close(got_small, half_product, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got_small, want_small)
        torch.testing.assert_close(got_small, want_small, rtol=1e-2, atol=1e-2)
        got_large = o(large)
    torch.testing.assert_close(
        got_large, torch.nn.functional.linear(large, o_weight), rtol=1e-5, atol=1e-5
    )


def test_without_half_small_steps_read_the_float32_weights() -> None:
    torch.manual_seed(4)
    block = Block().eval()
    x = torch.randn(1, 32)
    with torch.inference_mode():
        want = block(x)
        pack_linears(block, kernels=KERNELS)
        got = block(x)
    o = block.o_proj
    assert isinstance(o, PackedLinear)
    if KERNELS is None:
        assert o.plan is None and o.decode_weight is None
    else:
        assert o.plan is not None and o.decode_weight is not None
        assert o.decode_weight.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_float32_decode_copy_when_it_would_take_half_the_free_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if KERNELS is None:
        pytest.skip("the GEMV kernel is not available here")

    class Short:
        available = 4 * 1024  # bytes: less than twice the Block's Linears (~20 KB)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Short())
    block = Block().eval()
    with torch.inference_mode(), caplog.at_level("INFO", logger=cpu_linear.__name__):
        pack_linears(block, kernels=KERNELS)
    assert isinstance(block.o_proj, PackedLinear) and block.o_proj.plan is None
    assert "float32 decode weights not kept" in caplog.text


def test_without_the_kernel_float16_steps_use_torch_up_to_two_rows() -> None:
    o, o_weight = _half_packed_o_proj(5, kernels=None)
    assert o.plan is not None
    with torch.inference_mode():
        assert o.plan.gemv is None and o.plan.max_rows == HALF_MAX_ROWS == 2
        small = torch.randn(2, 32)
        expected = torch.nn.functional.linear(small.half(), o_weight.half()).float()
        assert torch.equal(o(small), expected)
    plain = Block().eval()
    with torch.inference_mode():
        pack_linears(plain)
    assert isinstance(plain.o_proj, PackedLinear) and plain.o_proj.plan is None


def test_without_half_there_are_no_float16_copies() -> None:
    block = Block().eval()
    with torch.inference_mode():
        pack_linears(block, kernels=KERNELS)
    assert isinstance(block.o_proj, PackedLinear)
    assert block.o_proj.decode_weight is None or block.o_proj.decode_weight.dtype == torch.float32
