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
original is freed unless it is kept for decoding, below, or tied to the embeddings).

Steps of at most `cpu_kernels.MAX_ROWS` tokens (decoding for up to four users) read a row-major
copy of each weight through our own GEMV (cpu_kernels.py), which streams weights faster than
oneDNN at so few rows: SmolLM2's Linears at one row in 19 ms against 25 (float32).
`pack_linears(model, kernels=...)` keeps the float32 weights it was given as that copy when
they take at most half of the memory available (they double the Linears' memory: a model that
fills RAM keeps oneDNN alone). `pack_linears(model, half=True)` (serve's --decode-float16) keeps a
float16 copy instead, which streams half the bytes: 10.6 ms for the same Linears, at float16's
precision, for 1.5 times the weights' memory. Without the kernels (cpu_kernels.load() says why),
the float16 copy is read through torch's float16 GEMV for steps of at most HALF_MAX_ROWS
tokens, where it still beats oneDNN, and no float32 copy is kept.

`pack_linears(model, bfloat16=True)` (serve's --dtype bfloat16 on a CPU: the weights' values are
bfloat16) holds the weights in bfloat16 and computes everything else in float32: larger steps
multiply in bfloat16 through oneDNN (each Linear's input rounded to bfloat16, float32
accumulation, the product rounded to bfloat16, then the float32 bias) where the CPU does so
natively (AVX512_BF16 or AMX: 1.5-2.2x float32's products at 32-512 rows on the AVX-512 test
host), else in float32 from the same values; steps of few tokens read a bfloat16 row-major copy
through our GEMV (half float32's bytes, float32 input and accumulation), as fast as the float16
copy. The Linears then take float32's memory (the packed copy and the row-major one)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from tuneserve.engine import cpu_kernels

logger = logging.getLogger(__name__)

# sibling projections that read the same input, computed as one product
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Without our GEMV, steps of at most this many tokens read the float16 copy through torch's
# float16 GEMV (float32 accumulation): from 4 rows on, oneDNN's float32 product is as fast.
HALF_MAX_ROWS = 2


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """Which weights steps of at most `max_rows` tokens read, and through what: our GEMV
    (`gemv`), else torch's float16 GEMV."""

    dtype: torch.dtype  # the row-major copy's: float32 (the original), float16 or bfloat16
    max_rows: int
    gemv: cpu_kernels.CpuKernels | None

    @classmethod
    def choose(
        cls, model: nn.Module, half: bool, gemv: cpu_kernels.CpuKernels | None, bfloat16: bool
    ) -> DecodePlan | None:
        if bfloat16:  # no torch GEMV beats oneDNN's bfloat16 product: only ours
            return cls(torch.bfloat16, cpu_kernels.MAX_ROWS, gemv) if gemv else None
        if half:
            return cls(torch.float16, cpu_kernels.MAX_ROWS if gemv else HALF_MAX_ROWS, gemv)
        if gemv is None:
            return None
        needed = sum(
            m.weight.numel() * m.weight.element_size()
            for m in model.modules()
            if type(m) is nn.Linear
        )
        available = psutil.virtual_memory().available
        if needed > available // 2:
            logger.info(
                "float32 decode weights not kept: %.1f GB, with %.1f GB of memory available; "
                "steps of few tokens use oneDNN (or pass --decode-float16)",
                needed / 1e9,
                available / 1e9,
            )
            return None
        return cls(torch.float32, cpu_kernels.MAX_ROWS, gemv)


def can_pack(model: nn.Module, dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN packing applies to a float32 model on a CPU with oneDNN; a bfloat16 one (`dtype`)
    is packed once it has been made float32 (`bfloat16=True` below)."""
    parameter = next(model.parameters())
    return (
        parameter.device.type == "cpu"
        and parameter.dtype == dtype
        and torch.backends.mkldnn.is_available()
    )


def native_bfloat16() -> bool:
    """oneDNN multiplies bfloat16 with the CPU's own instructions (AVX512_BF16 or AMX); without
    them it emulates the products, slower than float32's."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own, private
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


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
    """y = x W^T + b with W held in oneDNN's blocked layout (`compute`: float32, or bfloat16
    for a product in bfloat16), and, with a DecodePlan, also row-major (float32, float16 or
    bfloat16) for steps of at most `plan.max_rows` tokens."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        plan: DecodePlan | None = None,
        compute: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(weight, bias)
        self.compute = compute
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(compute), None)
        self.plan = plan
        # the row-major copy small steps read (float32: the original itself, no copy made)
        self.decode_weight = None if plan is None else weight.detach().to(plan.dtype).contiguous()
        # its [in, out] view for torch's float16 GEMV: torch.mm on it is the product F.linear
        # would dispatch to, without F.linear's own layers of dispatch
        self._decode_t = None if self.decode_weight is None else self.decode_weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y: torch.Tensor
        plan = self.plan
        if plan is not None and flat.shape[0] <= plan.max_rows:
            assert self.decode_weight is not None and self._decode_t is not None
            if plan.gemv is not None:
                y = plan.gemv.linear(flat, self.decode_weight, self.bias_data)
            else:
                y = torch.mm(flat.to(torch.float16), self._decode_t).float()
                if self.bias_data is not None:
                    y += self.bias_data
        elif self.compute == torch.float32:
            y = torch.ops.mkldnn._linear_pointwise(
                flat, self.packed, self.bias_data, "none", [], ""
            )
        else:  # a bfloat16 product comes out in bfloat16; the bias is added in float32
            y = torch.ops.mkldnn._linear_pointwise(
                flat.to(self.compute), self.packed, None, "none", [], ""
            ).float()
            if self.bias_data is not None:
                y += self.bias_data
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


def _fuse_group(
    parent: nn.Module, names: tuple[str, ...], plan: DecodePlan | None, compute: torch.dtype
) -> bool:
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
    product = PackedLinear(weight, bias, plan, compute)
    group = _FusedGroup(product, tuple(m.out_features for m in linears))
    for index, (holder, attribute, linear) in enumerate(slots):
        setattr(holder, attribute, FusedMember(group, index, linear))
    return True


def pack_linears(
    model: nn.Module,
    half: bool = False,
    kernels: cpu_kernels.CpuKernels | None = None,
    bfloat16: bool = False,
) -> tuple[int, int]:
    """Pack every nn.Linear of a float32 CPU model in place (see the module docstring);
    returns (fused groups, packed Linears). `half` keeps float16 copies for steps of few tokens
    (decoding for one to four users): about twice as fast there, at float16's precision.
    `bfloat16` holds weights whose values are bfloat16 in bfloat16 (not with `half`).
    `kernels` (cpu_kernels.for_model) brings our GEMV; without them torch's kernels serve."""
    if half and bfloat16:
        raise ValueError("float16 decode copies of bfloat16 weights: choose one")
    plan = DecodePlan.choose(model, half, kernels, bfloat16)
    compute = torch.bfloat16 if bfloat16 and native_bfloat16() else torch.float32
    groups = 0
    for parent in list(model.modules()):
        for names in FUSED_GROUPS:
            groups += _fuse_group(parent, names, plan, compute)
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child.weight, child.bias, plan, compute))
                packed += 1
    logger.info(
        "CPU %s weights: %d projection groups fused, %d Linears packed (oneDNN, %s products)%s",
        "bfloat16" if bfloat16 else "float32",
        groups,
        packed,
        str(compute)[6:],
        ""
        if plan is None
        else f"; steps of up to {plan.max_rows} tokens read {str(plan.dtype)[6:]} weights "
        f"through {'our GEMV' if plan.gemv else 'torch'}",
    )
    if not bfloat16 and native_bfloat16():
        logger.info(
            "this CPU multiplies bfloat16 natively (AVX512_BF16/AMX): --dtype bfloat16 serves "
            "bfloat16 weights 1.4-1.7x faster than float32 (benchmarks/README.md)"
        )
    return groups, packed
