"""Faster Linear layers for float32 on CPU: oneDNN-packed weights, fused projections.

On a CPU, decoding is a chain of small matrix products bound by how fast the weights stream
from memory. torch's default path (MKL's sgemm) ran SmolLM2's 210 layer Linears in 47.6 ms at
batch 1 on the 2-core AVX2 machine, about 9 GB/s; oneDNN's inner product on a weight reordered
once into its blocked layout (what inductor does when it freezes a model) uses every core, and
projections that read the same input fused into one product (q/k/v; gate/up) cut the calls per
layer from 7 to 4: 27.7 ms at batch 1, 43 vs 105 ms at 8, 77 vs 157 ms at 32 (benchmarks/README.md,
"Where a step's time goes").

`pack_linears(model)` swaps, in place, every `nn.Linear` for a `PackedLinear` and every group of
sibling projections for `FusedMember`s over one packed product (inside LoRA wrappers too: the
wrapper keeps its adapters, its base layer becomes the member). Both are `nn.Linear` subclasses
with the right `in_features`/`out_features`, so LoRA wrapping and adapter checks see the layers
they expect; their `weight` is a zero-stride stand-in of the right shape, dtype and device (the
original is freed: the packed copy is the only one, except a weight tied to the embeddings).

`pack_linears(model, half=True)` (serve's --decode-float16) also keeps each weight in float16:
steps of at most HALF_MAX_ROWS tokens read that copy through torch's float16 GEMV (float32
accumulation), which streams half the bytes: the 30 layers' Linears of SmolLM2 at batch 1
took 24 ms against oneDNN's 51 in float32 (same machine, same minute), 32 vs 52 at 2 rows;
at 4 rows they are even (53 vs 53) and from 8 on float16 is behind (99 vs 64)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

# sibling projections that read the same input, computed as one product
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Steps of at most this many tokens read the float16 copy when there is one: there the
# product is bound by streaming the weights, and torch's float16 GEMV (float32 accumulation)
# streams half the bytes; from 4 rows on, oneDNN's float32 product is as fast or faster.
HALF_MAX_ROWS = 2


def can_pack(model: nn.Module) -> bool:
    """oneDNN packing applies to a float32 model on a CPU with oneDNN."""
    parameter = next(model.parameters())
    return (
        parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


class _LinearShape(nn.Linear):
    """An nn.Linear's attributes without its weight: the sizes, the bias, and as `weight` a
    zero-stride stand-in of the right shape, dtype and device (nothing reads its values)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.bias_data = None if bias is None else bias.detach().contiguous()
        self._stand_in = torch.empty((), dtype=weight.dtype, device=weight.device).expand(
            weight.shape
        )

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._stand_in

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.bias_data


class PackedLinear(_LinearShape):
    """y = x W^T + b with W held in oneDNN's blocked layout, and optionally also in float16
    for steps of at most HALF_MAX_ROWS tokens (see `pack_linears`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, half: bool = False) -> None:
        super().__init__(weight, bias)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.weight_f16 = weight.detach().to(torch.float16) if half else None
        # its [in, out] view: torch.mm on it is the product F.linear would dispatch to, without
        # F.linear's own layers of dispatch (at one row they cost as much as a small product)
        self._f16_t = None if self.weight_f16 is None else self.weight_f16.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y: torch.Tensor
        if self._f16_t is not None and flat.shape[0] <= HALF_MAX_ROWS:
            y = torch.mm(flat.to(torch.float16), self._f16_t).float()
            if self.bias_data is not None:
                y += self.bias_data
        else:
            y = torch.ops.mkldnn._linear_pointwise(
                flat, self.packed, self.bias_data, "none", [], ""
            )
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


@dataclass(eq=False)
class _FusedGroup:
    """One product for several projections of the same input; each member takes its slice.

    The modeling code calls the members one after another on the same tensor (q, k, v): the
    first call computes the product, the others take their slices of it. The input is held
    (compared by identity), so a new input is never mistaken for the last one.
    """

    linear: nn.Module
    sizes: tuple[int, ...]
    _input: torch.Tensor | None = None
    _outputs: tuple[torch.Tensor, ...] = ()
    _left: int = 0

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x or not self._left:
            self._input, self._outputs = x, self.linear(x).split(self.sizes, dim=-1)
            self._left = len(self.sizes)
        out = self._outputs[index]
        self._left -= 1
        if not self._left:  # every member has its slice: drop the references
            self._input, self._outputs = None, ()
        return out


class FusedMember(_LinearShape):
    """One projection of a fused group (its slice of the group's product)."""

    def __init__(self, group: _FusedGroup, index: int, original: nn.Linear) -> None:
        super().__init__(original.weight, original.bias)
        self.group, self.index = group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused slice {self.index}"


def _plain_linear(module: nn.Module | None) -> tuple[nn.Module, str, nn.Linear] | None:
    """(holder, attribute, Linear) for a plain nn.Linear, also inside a LoRA wrapper."""
    if module is None:
        return None
    base = getattr(module, "base_layer", None)  # engine/lora.py's BatchedLoRALinear
    if type(base) is nn.Linear:
        return module, "base_layer", base
    return None


def _fuse_group(parent: nn.Module, names: tuple[str, ...], half: bool) -> bool:
    found = []
    for name in names:
        child = getattr(parent, name, None)
        found.append((parent, name, child) if type(child) is nn.Linear else _plain_linear(child))
    if any(f is None for f in found):
        return False
    slots = [f for f in found if f is not None]
    linears = [linear for _, _, linear in slots]
    if len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
        return False
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    group = _FusedGroup(PackedLinear(weight, bias, half), tuple(m.out_features for m in linears))
    for index, (holder, attribute, linear) in enumerate(slots):
        setattr(holder, attribute, FusedMember(group, index, linear))
    return True


def pack_linears(model: nn.Module, half: bool = False) -> tuple[int, int]:
    """Pack every nn.Linear of a float32 CPU model in place (see the module docstring);
    returns (fused groups, packed Linears). `half` also keeps a float16 copy of each weight
    for small steps (decoding for one or two users): about twice as fast there, at float16's
    precision, for 1.5 times the weights' memory."""
    groups = 0
    for parent in list(model.modules()):
        for names in FUSED_GROUPS:
            groups += _fuse_group(parent, names, half)
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child.weight, child.bias, half))
                packed += 1
    logger.info(
        "CPU float32: %d projection groups fused, %d Linears packed (oneDNN)%s",
        groups,
        packed,
        ", float16 copies for steps of 1-2 tokens" if half else "",
    )
    return groups, packed
