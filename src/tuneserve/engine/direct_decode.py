"""Decoder layers for a step of 1-4 decode tokens as direct kernel calls (CPU, float32 model).

At one to four users a step's products stream the weights at the memory's speed through our
GEMV (cpu_kernels.py); what is left is Python: the lean forward reaches each product through
three or four module layers (the LoRA wrapper, the fused member, the packed Linear, the kernel's
wrapper), each with its checks, allocations and `nn.Module.__call__`, ~150 us a layer. Here a
layer is the same kernels called with pointers taken once, into buffers allocated once per row
count: on SmolLM2 (engine alone, one user) 1.13x the module path with `--decode-float16`, 1.22x
with an adapter in use, 1.08x in float32 (benchmarks/README.md, "Decoder layers in direct
calls").

The arithmetic is the lean forward's, op for op: the same kernels on the same weights, the LoRA
deltas through the modules' own plans (lora.py, read at every step: adapters come and go), the
model's own activation, the residual adds in the same order; greedy output stays identical.
`DirectDecode.of` returns None unless every layer is what it expects: q/k/v and gate/up fused,
every product packed with a GEMV plan (cpu_linear.py), the CPU kernels loaded; the lean forward
then keeps its module path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneserve.engine.attention import PackedStep, attend
from tuneserve.engine.cpu_kernels import MAX_ROWS, CpuKernels
from tuneserve.engine.cpu_linear import FusedMember, PackedLinear
from tuneserve.engine.lora import BatchedLoRALinear


@dataclass(frozen=True, slots=True)
class _Product:
    """One packed product's GEMV: its decode weight and bias, as pointers."""

    weight: torch.Tensor  # held: the pointers below point into it
    bias: torch.Tensor | None
    weight_ptr: int
    bias_ptr: int | None
    out: int
    width: int

    @classmethod
    def of(cls, linear: PackedLinear) -> _Product | None:
        weight, bias = linear.decode_weight, linear.bias_data
        if weight is None or linear.plan is None or linear.plan.gemv is None:
            return None
        if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
            return None
        return cls(
            weight,
            bias,
            weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            int(weight.shape[0]),
            int(weight.shape[1]),
        )


@dataclass(frozen=True, slots=True)
class _DirectLayer:
    attn: Any  # read at every step: a LoRA wrapper may arrive around a projection
    mlp: Any
    input_norm: tuple[int, float]  # (weight pointer, eps)
    post_norm: tuple[int, float]
    qkv: _Product
    qkv_sizes: tuple[int, int, int]
    o: _Product
    gate_up: _Product
    inter: int  # the MLP's intermediate size (gate's and up's outputs)
    down: _Product
    scaling: float
    sliding_window: int | None


def _packed(module: nn.Module) -> nn.Module:
    """The module under a LoRA wrapper (the wrapper itself is read at every step)."""
    return module.get_base_layer() if isinstance(module, BatchedLoRALinear) else module


def _group(members: list[nn.Module]) -> tuple[_Product, tuple[int, ...]] | None:
    """The fused product of `members` (in order), or None when they are not one group."""
    parts = [_packed(m) for m in members]
    fused = [p for p in parts if isinstance(p, FusedMember)]
    if len(fused) != len(parts):
        return None
    group = fused[0].group
    if any(p.group is not group or p.index != i for i, p in enumerate(fused)):
        return None
    if type(group.linear) is not PackedLinear:
        return None
    product = _Product.of(group.linear)
    return None if product is None else (product, tuple(group.sizes))


def _single(module: nn.Module) -> _Product | None:
    packed = _packed(module)
    return _Product.of(packed) if type(packed) is PackedLinear else None


def _norm(module: Any) -> tuple[int, float] | None:
    """(weight pointer, eps) of an RMSNorm as the lean forward's families write it, or None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if weight is None or eps is None or weight.dtype != torch.float32:
        return None
    if not weight.is_contiguous():
        return None
    return weight.data_ptr(), float(eps)


class DirectDecode:
    """The decoder layers of a lean forward (lean_forward.py) for decode steps of at most
    MAX_ROWS tokens, in direct kernel calls (see the module docstring)."""

    def __init__(
        self, layers: list[_DirectLayer], kernels: CpuKernels, heads: int, kv_heads: int, dim: int
    ) -> None:
        self.layers = layers
        self.kernels = kernels
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.steps = 0  # the steps computed here (the others went through the modules)

    @classmethod
    def of(
        cls, layers: list[Any], kernels: CpuKernels | None, heads: int, kv_heads: int, dim: int
    ) -> DirectDecode | None:
        """For the lean forward's `layers` (lean_forward._Layer) once packed, or None."""
        if kernels is None or not kernels.attends(dim):
            return None
        direct = []
        for layer in layers:
            attn, mlp = layer.attn, layer.mlp
            qkv = _group([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = _group([mlp.gate_proj, mlp.up_proj])
            o, down = _single(attn.o_proj), _single(mlp.down_proj)
            norms = _norm(layer.input_norm), _norm(layer.post_norm)
            if qkv is None or gate_up is None or o is None or down is None or None in norms:
                return None
            q_size, k_size, v_size = qkv[1]
            if (q_size, k_size, v_size) != (heads * dim, kv_heads * dim, kv_heads * dim):
                return None
            inter = gate_up[1][0]
            if gate_up[1] != (inter, inter) or down.width != inter:
                return None
            direct.append(
                _DirectLayer(
                    attn,
                    mlp,
                    norms[0],  # type: ignore[arg-type]
                    norms[1],  # type: ignore[arg-type]
                    qkv[0],
                    (q_size, k_size, v_size),
                    o,
                    gate_up[0],
                    inter,
                    down,
                    layer.scaling,
                    layer.sliding_window,
                )
            )
        return cls(direct, kernels, heads, kv_heads, dim)

    def computes(self, step: PackedStep) -> bool:
        """Whether this step is one for these layers: decode rows only, at most MAX_ROWS."""
        return (
            not step.prefills
            and step.num_tokens == step.num_decodes
            and 0 < step.num_tokens <= MAX_ROWS
            and step.kernels is not None
        )

    def _buffers_for(self, rows: int) -> dict[str, torch.Tensor]:
        if rows not in self._buffers:
            first = self.layers[0]
            hidden = first.o.out
            self._buffers[rows] = {
                "x": torch.empty(rows, hidden),
                "qkv": torch.empty(rows, first.qkv.out),
                "q": torch.empty(rows, self.heads, self.dim),
                "k": torch.empty(rows, self.kv_heads, self.dim),
                "o": torch.empty(rows, hidden),
                "gate_up": torch.empty(rows, first.gate_up.out),
                "down": torch.empty(rows, hidden),
            }
        return self._buffers[rows]

    def __call__(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: PackedStep
    ) -> torch.Tensor:
        """hidden [N, hidden] (the embeddings, updated in place), cos/sin [N, D] (sign in sin)
        -> the last layer's hidden states."""
        n = hidden.shape[0]
        self.steps += 1
        raw = self.kernels.raw
        gemv, norm, rope = raw.gemv, raw.rms_norm, raw.rope
        heads, kv_heads, dim = self.heads, self.kv_heads, self.dim
        threads = torch.get_num_threads()
        buffers = self._buffers_for(n)
        x, qkv, q, k = buffers["x"], buffers["qkv"], buffers["q"], buffers["k"]
        o, gate_up, down = buffers["o"], buffers["gate_up"], buffers["down"]
        width = hidden.shape[1]
        hidden_ptr, x_ptr, qkv_ptr = hidden.data_ptr(), x.data_ptr(), qkv.data_ptr()
        o_ptr, gate_up_ptr, down_ptr = o.data_ptr(), gate_up.data_ptr(), down.data_ptr()
        q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
        cos, sin = cos.contiguous(), sin.contiguous()
        cos_ptr, sin_ptr = cos.data_ptr(), sin.data_ptr()
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.attn, layer.mlp
            q_size, k_size, _ = layer.qkv_sizes
            # attention
            norm(hidden_ptr, width, layer.input_norm[0], x_ptr, n, width, layer.input_norm[1])
            p = layer.qkv
            gemv[p.weight.dtype](p.weight_ptr, x_ptr, p.bias_ptr, qkv_ptr, n, p.out, width, threads)
            _lora(attn.q_proj, qkv[:, :q_size], x)
            _lora(attn.k_proj, qkv[:, q_size : q_size + k_size], x)
            _lora(attn.v_proj, qkv[:, q_size + k_size :], x)
            rope(qkv_ptr, p.out, cos_ptr, sin_ptr, q_ptr, n, heads, dim)
            rope(qkv_ptr + 4 * q_size, p.out, cos_ptr, sin_ptr, k_ptr, n, kv_heads, dim)
            v = qkv[:, q_size + k_size :].view(n, kv_heads, dim)
            out = attend(
                step, index, q, k, v, scaling=layer.scaling, sliding_window=layer.sliding_window
            ).view(n, heads * dim)
            p = layer.o
            gemv[p.weight.dtype](
                p.weight_ptr, out.data_ptr(), p.bias_ptr, o_ptr, n, p.out, p.width, threads
            )
            _lora(attn.o_proj, o, out)
            hidden.add_(o)
            # MLP
            norm(hidden_ptr, width, layer.post_norm[0], x_ptr, n, width, layer.post_norm[1])
            p = layer.gate_up
            gemv[p.weight.dtype](
                p.weight_ptr, x_ptr, p.bias_ptr, gate_up_ptr, n, p.out, width, threads
            )
            inter = layer.inter
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            _lora(mlp.gate_proj, gate, x)
            _lora(mlp.up_proj, up, x)
            act = mlp.act_fn(gate) * up
            p = layer.down
            gemv[p.weight.dtype](
                p.weight_ptr, act.data_ptr(), p.bias_ptr, down_ptr, n, p.out, inter, threads
            )
            _lora(mlp.down_proj, down, act)
            hidden.add_(down)
        return hidden


def _lora(module: nn.Module, y: torch.Tensor, x: torch.Tensor) -> None:
    """y += module's LoRA delta for this step's rows, when it is a wrapper with one in use."""
    if isinstance(module, BatchedLoRALinear):
        module.add_delta(y, x)
