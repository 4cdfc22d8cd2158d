"""A lean forward for Llama-family decoders: HF's modules and weights, without HF's framework.

At one user, a decode step on a CPU is a few hundred small operations besides the matrix
products, and HF's modeling code adds its own Python around each of them: decorators that
inspect keyword arguments on every layer and attention call, `[1, N, ...]` views and
transposes, `rotate_half`'s slices and concatenation, a causal-mask factory per forward. On
SmolLM2 that was ~28 ms of a ~75 ms step (benchmarks/README.md, "One user on a CPU").

`LeanForward.of(model)` recognises the exact classes of Llama, Mistral and Qwen2 (same layer,
differing only in biases, which their Linears hold, and the sliding window) and runs their
decoder itself, token-major (`[N, H, D]`, what the KV cache stores), calling the model's own
submodules for every product: the packed and fused Linears of cpu_linear.py and the LoRA
wrappers of lora.py work unchanged. The arithmetic is HF's, op for op in the same order (the
RMSNorm modules themselves; RoPE as `x * cos + rotate_half(x) * sin` with the half-rotation's
sign folded into `sin`: an exact rewrite), so greedy output stays token-identical to
transformers + PEFT. Any other architecture (Phi-3's fused projections, Gemma's scaled
embeddings...) keeps HF's forward with our attention plugged in (attention.py).

Given the CPU kernels (cpu_kernels.py; a float32 model on the CPU) RMSNorm and RoPE are one call
each: RoPE the same arithmetic bit for bit, RMSNorm's sum of squares in another order (within an
ulp or two of torch's). At one token they were ~7 torch ops each, ~4 ms of a ~33 ms step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneserve.engine.attention import PackedStep, attend
from tuneserve.engine.cpu_kernels import CpuKernels
from tuneserve.engine.direct_decode import DirectDecode


def _families() -> dict[type, tuple[type, type, type, type]]:
    """model class -> (decoder layer, attention, MLP, RMSNorm) classes this forward computes."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {
        llama.LlamaForCausalLM: (
            llama.LlamaDecoderLayer,
            llama.LlamaAttention,
            llama.LlamaMLP,
            llama.LlamaRMSNorm,
        ),
        mistral.MistralForCausalLM: (
            mistral.MistralDecoderLayer,
            mistral.MistralAttention,
            mistral.MistralMLP,
            mistral.MistralRMSNorm,
        ),
        qwen2.Qwen2ForCausalLM: (
            qwen2.Qwen2DecoderLayer,
            qwen2.Qwen2Attention,
            qwen2.Qwen2MLP,
            qwen2.Qwen2RMSNorm,
        ),
    }


@dataclass(frozen=True, slots=True)
class _Layer:
    """One decoder layer's parts. Its Linears are read from `attn` and `mlp` at every call:
    packing (cpu_linear.py) and LoRA wrapping (lora.py) replace them after this is built."""

    input_norm: Any
    attn: Any
    post_norm: Any
    mlp: Any
    scaling: float
    sliding_window: int | None


class LeanForward:
    """The decoder of a supported model run directly (see the module docstring)."""

    def __init__(
        self, model: nn.Module, kernels: CpuKernels | None = None, direct: bool = True
    ) -> None:
        config: Any = model.config
        decoder: Any = model.model
        self.model: Any = model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.final_norm = decoder.norm
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.layers: list[_Layer] = []
        for index, layer in enumerate(decoder.layers[: config.num_hidden_layers]):
            attn = layer.self_attn
            assert attn.layer_idx == index
            # Qwen2 sets it per layer (None on full-attention layers); Mistral in its config
            window = (
                attn.sliding_window
                if hasattr(attn, "sliding_window")
                else getattr(config, "sliding_window", None)
            )
            self.layers.append(
                _Layer(
                    layer.input_layernorm,
                    attn,
                    layer.post_attention_layernorm,
                    layer.mlp,
                    float(attn.scaling),
                    window,
                )
            )
        self.head_dim = int(attn.head_dim)
        half = self.head_dim // 2
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) * sign: the sign goes into sin
        parameter = next(model.parameters())
        self._sign = torch.cat([torch.full((half,), -1.0), torch.ones(half)]).to(
            parameter.device, parameter.dtype
        )
        self.kernels = kernels  # RMSNorm and RoPE through them (cpu_kernels.for_model)
        # decode steps of a few tokens in direct kernel calls (direct_decode.py), built at the
        # first step: the Linears are packed by then (the engine packs before its first step)
        # (`direct=False` keeps the module path for every step: for comparison)
        self._direct: DirectDecode | None = None
        self._direct_built = not direct

    @classmethod
    def of(
        cls, model: nn.Module, kernels: CpuKernels | None = None, direct: bool = True
    ) -> LeanForward | None:
        """A lean forward for `model`, or None when its architecture is not one it computes."""
        classes = _families().get(type(model))
        if classes is None:
            return None
        layer_cls, attn_cls, mlp_cls, norm_cls = classes
        decoder: Any = getattr(model, "model", None)
        config: Any = model.config
        if decoder is None or type(decoder.norm) is not norm_cls:
            return None
        expected = (layer_cls, attn_cls, mlp_cls, norm_cls, norm_cls)
        for layer in decoder.layers:
            parts = (
                layer,
                layer.self_attn,
                layer.mlp,
                layer.input_layernorm,
                layer.post_attention_layernorm,
            )
            if tuple(type(part) for part in parts) != expected:
                return None
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            return None
        return cls(model, kernels, direct)

    def __call__(
        self, input_ids: torch.Tensor, step: PackedStep, keep: torch.Tensor
    ) -> torch.Tensor:
        """input_ids [N] of the packed step -> the logits of the rows in `keep`: [K, V]."""
        hidden: torch.Tensor = self.embed(input_ids)  # [N, hidden]
        cos, sin = self.rotary(hidden, position_ids=step.positions[None])  # [1, N, D] each
        cos, sin = cos[0], sin[0] * self._sign  # [N, D]
        direct = self._direct_decode()
        if direct is not None and direct.computes(step):
            hidden = direct(hidden, cos, sin, step)
        else:
            hidden = self._layers(hidden, cos, sin, step)
        last = self._norm(self.final_norm, hidden.index_select(0, keep))  # only the kept rows
        logits: torch.Tensor = self.model.lm_head(last)
        return logits

    def _layers(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: PackedStep
    ) -> torch.Tensor:
        """The decoder layers through the model's modules: hidden [N, hidden] updated in
        place, cos/sin [N, D] (rotate_half's sign in sin)."""
        n = hidden.shape[0]
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        norm, rope = self._norm, self._rope
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.attn, layer.mlp
            x = norm(layer.input_norm, hidden)
            q = rope(attn.q_proj(x), cos, sin, heads)  # [N, H, D]
            k = rope(attn.k_proj(x), cos, sin, kv_heads)
            v = attn.v_proj(x).view(n, kv_heads, dim)
            out = attend(
                step,
                index,
                q,
                k,
                v,
                scaling=layer.scaling,
                sliding_window=layer.sliding_window,
            )
            hidden.add_(attn.o_proj(out.view(n, heads * dim)))  # hidden: ours
            x = norm(layer.post_norm, hidden)
            hidden.add_(mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))
        return hidden

    def _direct_decode(self) -> DirectDecode | None:
        if not self._direct_built:
            self._direct_built = True
            self._direct = DirectDecode.of(
                self.layers, self.kernels, self.num_heads, self.num_kv_heads, self.head_dim
            )
        return self._direct

    def _norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm `module` on x [N, hidden]."""
        if self.kernels is None:
            return module(x)  # type: ignore[no-any-return]
        return self.kernels.rms_norm(x, module.weight, float(module.variance_epsilon))

    def _rope(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
    ) -> torch.Tensor:
        """x [N, heads * D] -> x * cos + rotate_half(x) * sin: [N, heads, D] (the sign in sin)."""
        if self.kernels is not None:
            return self.kernels.rope(x, cos, sin, heads)
        x = x.view(x.shape[0], heads, self.head_dim)
        return x * cos[:, None] + x.roll(self.head_dim // 2, -1) * sin[:, None]
