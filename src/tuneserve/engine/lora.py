"""Batched multi-LoRA: every row of a batch through its own adapter in one forward.

Each targeted `nn.Linear` of the base model is replaced by a `BatchedLoRALinear` that keeps the
base layer and up to `max_loras` adapter slots, stacked per slot: `a [S, in, r]` and
`b [S, r, out]`, r = the largest rank loaded at this module (a smaller rank is zero-padded: its
extra columns add exact zeros), the scale alpha/r (or alpha/sqrt(r) with rsLoRA) folded into b.
Per step every packed token carries its row's slot (-1 = no adapter), and one of two forms
computes the whole mixed batch (`LoRABatch.groups` picks, per step, by how the tokens spread):

- dense over the true-rank columns of the slots in use, `y = base(x) + ((x @ a_t) * mask) @ b_t`,
  a 0/1 mask `[N, R]` selecting each token's columns: three ops per module, nothing gathered;
- grouped, when many adapters share the step (the largest group at most 1/GROUPED_MIN_SPREAD
  of the tokens: 32 decodes on 8 adapters, even drawn at random): tokens grouped by slot, each
  group padded to the largest, one batched product per factor, `h = bmm(x[groups], a[slots])`,
  then `y.index_add_(tokens, bmm(h, b[slots]))`. A token meets only its own adapter's columns,
  where the dense form multiplies it by every adapter's in use (R = 8 x 16 = 128 columns with 8
  adapters of rank 16); but padding costs as much as tokens, so uneven groups (a long prompt on
  one adapter beside decodes on others) stay dense.

On a CPU in float32 with our kernels (`LoRABatch.kernels`), a step whose tokens are not all on
one adapter takes neither form: one call of csrc/lora.c a module, each token through its own
adapter's A and B only (no padding, no other adapters' columns), in blocks of up to four
tokens on one adapter, the blocks sorted by adapter so each adapter's weights stream from
memory once. For SmolLM2's 120 modules (random weights in their shapes, one run, a busy host): 32
decodes on 8 adapters 3.9 ms against 11.6 grouped; a 512-token prompt chunk beside 31 decodes
on 8 adapters 22 ms against 94 dense; on 2 adapters 22 against 40. A step all on one adapter
keeps the dense form's two products (no mask: BLAS at its best).

Measured on SmolLM2-135M (q/k/v/o at rank 16, a 2-core AVX-512 host): per layer, even groups,
dense 14 / 45 / 69 / 289 us at 1 token / 32 tokens on 1, 2 and 8 adapters, grouped 37 / 97 / 96
/ 145; the whole forward (`python -m benchmarks.lora_forms`) of 32 decodes on 8 adapters drawn
at random 56.2 ms dense, 54.1 grouped, 47.4 on one adapter; four 128-token prompts on 4 adapters
beside 28 decodes on 8, 473 vs 397 (benchmarks/README.md, "Many adapters in one step").
Modules no adapter in use touches, and steps with no adapter rows, skip the LoRA path.

`LoRAManager` owns the slots: a bounded set of hot slots filled on demand, least recently used
adapter evicted when no running request holds it; a CPU-side store of loaded adapter weights
(LRU, `max_cpu_loras`). The files are read, and the scales computed, by models/adapters.py (the one
home of the PEFT rules); what is this engine's own is that it adapts nn.Linear layers only. A
request whose adapter cannot get a slot waits (the scheduler retries next step); it never fails
for that.

Adapters come and go while serving (`install`, `remove`): a new adapter's modules are wrapped
when it arrives (the other slots have rank 0 there). A replaced or removed version leaves the
name index at once, so later admissions get the new version (or an error); a slot still pinned
by running requests keeps its weights ("retiring") until its last request releases it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tuneserve.engine.types import AdapterUsage
from tuneserve.errors import AdapterError, UnknownAdapterError
from tuneserve.models.adapters import (
    CONFIG_FILE,
    lora_pairs,
    read_shapes,
    read_tensors,
    served_config,
    weights_file,
)
from tuneserve.models.types import AdapterSpec

if TYPE_CHECKING:
    from tuneserve.engine.cpu_kernels import CpuKernels

logger = logging.getLogger(__name__)

# Tokens are grouped by adapter when the largest group holds at most 1/GROUPED_MIN_SPREAD of
# a module's tokens: the padded groups then cost less than the dense columns (see the docstring)
GROUPED_MIN_SPREAD = 4


# -- the batched ops and their oracle -----------------------------------------------------------
def lora_reference(
    x: torch.Tensor,
    token_slots: Sequence[int],
    weights: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
) -> torch.Tensor:
    """The plain loop the batched op must equal; returns the LoRA delta only.

    x: [N, in]; token_slots[i] in {-1, 0..S-1}; weights[s] = (A [r, in], B_scaled [out, r]) or None.
    """
    out_features = next(w[1].shape[0] for w in weights if w is not None)
    delta = x.new_zeros(x.shape[0], out_features)
    for i, slot in enumerate(token_slots):
        if slot >= 0 and weights[slot] is not None:
            a, b = weights[slot]  # type: ignore[misc]
            delta[i] = b @ (a @ x[i])
    return delta


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a_t: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """y += the per-token LoRA delta of slot-stacked weights (in place; returns y).

    Semantics (see `lora_reference`):
        for i in range(N):
            s = token_slot[i]
            if s >= 0 and slot s has weights here:
                y[i] += B_s @ (A_s @ x[i])
    where a_t = cat([A_s.T for s in slots], 1) [in, R], b = cat([B_s.T ...], 0) [R, out] and
    mask[i, c] = 1 iff column c belongs to slot token_slot[i]; None when every token uses the
    one slot of a_t (one user chatting, or every row on one adapter): all ones, skipped.
    """
    # y: [N, out], x: [N, in], a_t: [in, R], b: [R, out], mask: [N, R]
    h = x @ a_t
    return y.addmm_(h if mask is None else h.mul_(mask), b)


def add_lora_grouped(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: SlotGroups
) -> torch.Tensor:
    """y += the per-token LoRA delta, tokens grouped by slot (in place; returns y).

    The same semantics as `add_lora`, with a [G, in, r] and b [G, r, out] the weights of the
    groups' slots (`groups.slots`, zero-padded to one rank) and `groups.index` [G * P] the token
    of each padded position: a padding position points at token 0, its h is zeroed, so it adds
    exact zeros there.
    """
    # y: [N, out], x: [N, in]
    count, width = groups.shape
    h = torch.bmm(x.index_select(0, groups.index).view(count, width, -1), a)  # [G, P, r]
    if groups.padding is not None:
        h.mul_(groups.padding)
    return y.index_add_(0, groups.index, torch.bmm(h, b).view(count * width, -1))


@dataclass(frozen=True, slots=True)
class SlotGroups:
    """The tokens of one step grouped by slot, each group padded to the largest (see
    `add_lora_grouped`)."""

    slots: tuple[int, ...]  # the slots of these tokens, ascending
    index: torch.Tensor  # [G * P] long: the token at each padded position (padding: 0)
    padding: torch.Tensor | None  # [G, P, 1] 0/1: 0 at padding (None: every group is full)
    shape: tuple[int, int]  # (G, P)

    @classmethod
    def of(cls, token_slots: Sequence[int], device: torch.device, dtype: torch.dtype) -> SlotGroups:
        members: dict[int, list[int]] = {}
        for token, slot in enumerate(token_slots):
            if slot >= 0:
                members.setdefault(slot, []).append(token)
        slots = sorted(members)
        width = max(len(tokens) for tokens in members.values())
        index = [t for s in slots for t in (*members[s], *[0] * (width - len(members[s])))]
        padding = None
        if any(len(members[s]) < width for s in slots):
            padding = torch.tensor(
                [[1.0] * len(members[s]) + [0.0] * (width - len(members[s])) for s in slots],
                dtype=dtype,
                device=device,
            )[:, :, None]
        return cls(
            tuple(slots),
            torch.tensor(index, dtype=torch.long, device=device),
            padding,
            (len(slots), width),
        )


# y [N, out] += the LoRA delta of x [N, in], for one step's tokens at one module
_Plan = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- the per-step assignment shared by every wrapped module ---------------------------------
class LoRABatch:
    """Which slot each packed token uses this step (-1 = none); masks and groups cached.

    A step that repeats the last one's slots (one user decoding, a steady batch) keeps its
    masks and groups, and `epoch` stays the same: the wrapped layers keep their plans too.
    """

    def __init__(self) -> None:
        self.active: frozenset[int] = frozenset()  # the slots some token uses (none between steps)
        self.epoch = 0  # changes whenever a step's slots differ from the last step's
        # (token slots, kept rows' slots, device) of the last step
        self._key: tuple[tuple[int, ...], tuple[int, ...], torch.device] = (
            (),
            (),
            torch.device("cpu"),
        )
        self._used: frozenset[int] = frozenset()
        self._masks: dict[Any, torch.Tensor | None] = {}
        self._groups: dict[Any, SlotGroups | None] = {}
        self._rows: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._single: dict[Any, bool] = {}
        # our CPU kernels (cpu_kernels.py), set by an engine that has them: a float32 CPU step
        # on more than one adapter then runs as one kernel call a module (`token_rows`)
        self.kernels: CpuKernels | None = None

    def set(
        self, token_slots: Sequence[int], keep_slots: Sequence[int], device: torch.device
    ) -> None:
        """This step's slot per packed token, and per row whose logits are kept (-1 = none)."""
        key = (tuple(token_slots), tuple(keep_slots), device)
        if key != self._key:
            self._key, self.epoch = key, self.epoch + 1
            self._masks.clear()
            self._groups.clear()
            self._rows.clear()
            self._single.clear()
            self._used = frozenset(s for s in key[0] if s >= 0)
        self.active = self._used

    def clear(self) -> None:
        """Between steps: no adapter applies (what a repeated step reuses stays)."""
        self.active = frozenset()

    def _slots_of(self, num_tokens: int) -> Sequence[int]:
        """The slot of each token a module sees: every packed token, or after logits_to_keep
        (lm_head) one per kept row."""
        tokens, kept, _ = self._key
        slots = tokens if num_tokens == len(tokens) else kept
        assert num_tokens == len(slots)
        return slots

    def groups(self, num_tokens: int, dtype: torch.dtype) -> SlotGroups | None:
        """The tokens of a module seeing `num_tokens` tokens grouped by slot, when the grouped
        form pays for them (see the module docstring); None: the dense form."""
        key = (num_tokens, dtype)
        if key not in self._groups:
            slots = self._slots_of(num_tokens)
            counts = collections.Counter(s for s in slots if s >= 0)
            spread = bool(counts) and max(counts.values()) * GROUPED_MIN_SPREAD <= num_tokens
            self._groups[key] = SlotGroups.of(slots, self._key[2], dtype) if spread else None
        return self._groups[key]

    def token_rows(
        self, num_tokens: int, rows: dict[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's row in a module's weight stack (`rows`: slot -> row), -1 where its
        slot has none there or it uses no adapter, and the tokens sorted by it: [N] long
        each, on the CPU (cpu_kernels.lora_delta)."""
        key = (num_tokens, tuple(sorted(rows.items())))
        if key not in self._rows:
            slots = self._slots_of(num_tokens)
            token_rows = torch.tensor([rows.get(s, -1) for s in slots], dtype=torch.long)
            self._rows[key] = (token_rows, torch.argsort(token_rows, stable=True))
        return self._rows[key]

    def single_slot(self, num_tokens: int, used: tuple[int, ...]) -> bool:
        """Every one of the `num_tokens` tokens on the one slot in `used` (no mask needed)."""
        key = (num_tokens, used)
        if key not in self._single:
            slots = self._slots_of(num_tokens)
            self._single[key] = len(used) == 1 and all(s == used[0] for s in slots)
        return self._single[key]

    def in_use(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """The slots some token uses this step that have weights at a module of `ranks`."""
        return tuple(s for s in sorted(self.active) if ranks[s])

    def mask(
        self, ranks: tuple[int, ...], num_tokens: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The dense form's 0/1 mask [N, R] for a module whose slots have `ranks`: R columns,
        the true ranks of the slots `in_use` there, in slot order (the slots loaded but unused
        this step take no part: the cost follows the adapters in use, not the adapters hot);
        mask[i, c] = 1 iff column c is token i's slot's. None when it would be all ones: every
        token on the one slot in use."""
        key = (ranks, num_tokens, dtype)
        if key not in self._masks:
            slots = self._slots_of(num_tokens)
            used = self.in_use(ranks)
            device = self._key[2]
            if self.single_slot(num_tokens, used):
                self._masks[key] = None
            else:
                col_slot = torch.tensor([s for s in used for _ in range(ranks[s])], device=device)
                token_slot = torch.tensor(slots, device=device)
                self._masks[key] = (token_slot[:, None] == col_slot[None, :]).to(dtype)
        return self._masks[key]


class BatchedLoRALinear(nn.Module):
    """A base nn.Linear plus slot-stacked LoRA weights applied per token (vLLM-style layer).

    The wrapped layer is `base_layer` and `get_base_layer()` returns it, as PEFT's layers do:
    code that inspects the model (adapter validation) sees through the wrapper.
    """

    def __init__(self, base: nn.Linear, num_slots: int, batch: LoRABatch) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.batch = batch
        self._slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_slots
        # the loaded slots' weights, stacked (zero-padded to one rank r): a [L, in, r],
        # b [L, r, out]; slot s is at row self._row[s]
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self._row: dict[int, int] = {}
        self.ranks: tuple[int, ...] = (0,) * num_slots  # per slot here (0 = nothing loaded)
        # (the slots, the form, their weights in that form): kept while the same slots are in
        # use (one user chatting, a steady set of adapters)
        self._picked: tuple[tuple[int, ...], bool, torch.Tensor, torch.Tensor] | None = None
        self._plan_key: Any = None
        self._plan: _Plan | None = None

    # attributes some modeling code reads off its projections
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Load slot `slot`: a [r, in], b [out, r] with the scale already folded in."""
        if (
            a.shape[1] != self.in_features
            or b.shape[0] != self.out_features
            or a.shape[0] != b.shape[1]
        ):
            raise ValueError(
                f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit a Linear "
                f"{self.in_features}->{self.out_features}"
            )
        weight = self.base_layer.weight
        self._slots[slot] = (a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype))
        self._restack()

    def reset_lora(self, slot: int) -> None:
        if self._slots[slot] is not None:
            self._slots[slot] = None
            self._restack()

    def slot_weights(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return list(self._slots)

    def _restack(self) -> None:
        self._picked = self._plan_key = None
        ranks = tuple(0 if w is None else w[0].shape[0] for w in self._slots)
        device = self.base_layer.weight.device
        self.ranks = ranks
        loaded = [(s, w) for s, w in enumerate(self._slots) if w is not None]
        self._row = {s: row for row, (s, _) in enumerate(loaded)}
        if not loaded:
            self.a = self.b = None
            return
        dtype, width = self.base_layer.weight.dtype, max(ranks)
        self.a = torch.zeros(len(loaded), self.in_features, width, dtype=dtype, device=device)
        self.b = torch.zeros(len(loaded), width, self.out_features, dtype=dtype, device=device)
        for row, (_, (a, b)) in enumerate(loaded):
            self.a[row, :, : a.shape[0]] = a.T
            self.b[row, : a.shape[0]] = b.T

    def _weights(self, slots: tuple[int, ...], grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of `slots` (ascending): grouped, a [G, in, r] and b [G, r, out]; dense,
        their true-rank columns a_t [in, R] and b_t [R, out] (`LoRABatch.mask`'s order)."""
        if self._picked is None or self._picked[:2] != (slots, grouped):
            assert self.a is not None and self.b is not None
            if grouped and slots == tuple(self._row):  # every loaded slot: no copy
                a, b = self.a, self.b
            elif grouped:  # a slot with no weights here: zeros (its tokens add nothing)
                pairs = [self._slot(s) for s in slots]
                a = torch.stack([a for a, _ in pairs])
                b = torch.stack([b for _, b in pairs])
            else:
                rows = [(self._row[s], self.ranks[s]) for s in slots]
                a = torch.cat([self.a[row, :, :rank] for row, rank in rows], 1)
                b = torch.cat([self.b[row, :rank] for row, rank in rows], 0)
            self._picked = (slots, grouped, a.contiguous(), b.contiguous())
        return self._picked[2], self._picked[3]

    def _slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot `slot`'s stacked (a, b), zeros where it has no weights at this module."""
        assert self.a is not None and self.b is not None
        row = self._row.get(slot)
        if row is None:
            return self.a.new_zeros(self.a.shape[1:]), self.b.new_zeros(self.b.shape[1:])
        return self.a[row], self.b[row]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base_layer(x)
        if self.a is None or not self.batch.active:
            return y
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y2 = y if y.dim() == 2 else y.view(-1, self.out_features)  # y: fresh, ours
        self.add_delta(y2, x2)
        return y

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y [N, out] += this step's LoRA delta for x [N, in], in place: y holds the base
        layer's product of x (`forward`, or direct_decode.py's own GEMV)."""
        if self.a is None or not self.batch.active:
            return
        key = (self.batch.epoch, x.shape[0], x.dtype)
        if self._plan_key != key:
            self._plan_key, self._plan = key, self._make_plan(x.shape[0], x.dtype)
        if self._plan is not None:
            self._plan(y, x)

    def _make_plan(self, num_tokens: int, dtype: torch.dtype) -> _Plan | None:
        """How this step's tokens get their deltas here (None: no adapter in use has weights
        here); kept while the steps repeat (`LoRABatch.epoch`)."""
        used = self.batch.in_use(self.ranks)
        if not used:
            return None
        kernels, stacked_a, stacked_b = self.batch.kernels, self.a, self.b
        assert stacked_a is not None and stacked_b is not None  # `used` is not empty
        if (
            kernels is not None
            and kernels.lora_fits(stacked_a)
            and not self.batch.single_slot(num_tokens, used)
        ):
            rows, order = self.batch.token_rows(num_tokens, self._row)
            return lambda y, x: kernels.lora_delta(y, x, stacked_a, stacked_b, rows, order)
        groups = self.batch.groups(num_tokens, dtype)
        if groups is not None:
            a, b = self._weights(groups.slots, grouped=True)
            return lambda y, x: add_lora_grouped(y, x, a, b, groups)
        a_t, b_t = self._weights(used, grouped=False)
        mask = self.batch.mask(self.ranks, num_tokens, dtype)
        return lambda y, x: add_lora(y, x, a_t, b_t, mask)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}"


# -- adapter files -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AdapterLayout:
    """What an adapter's weights file holds: module path -> rank (read from headers only)."""

    name: str
    file: Path
    ranks: dict[str, int]


@dataclass(slots=True)
class AdapterWeights:
    """One adapter's weights in CPU memory: module path -> (A [r, in], B_scaled [out, r])."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.modules.values()
        )


def read_layout(spec: AdapterSpec) -> AdapterLayout:
    """The module paths and ranks in the adapter's weights file, without loading the weights."""
    served_config(spec)
    file = weights_file(spec.name, Path(spec.path))
    pairs = lora_pairs(spec.name, file, read_shapes(spec.name, file))
    return AdapterLayout(spec.name, file, {module: pair.a[0] for module, pair in pairs.items()})


def load_adapter_weights(spec: AdapterSpec, layout: AdapterLayout) -> AdapterWeights:
    """Read A and B from the file, fold the scale into B (float32, on CPU)."""
    config = served_config(spec)
    pairs = lora_pairs(spec.name, layout.file, read_tensors(spec.name, layout.file))
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in pairs.items():
        rank = config.rank_for(module)
        if pair.a.shape[0] != rank:  # the scale below is PEFT's, computed from the config's r
            raise AdapterError(
                spec.name,
                f"{layout.file}: {pair.keys[0]} has rank {pair.a.shape[0]} but {CONFIG_FILE} "
                f"says r={rank} (see r and rank_pattern)",
            )
        b = pair.b.float() * config.scale_for(module)
        modules[module] = (pair.a.float().contiguous(), b.contiguous())
    return AdapterWeights(spec.name, modules)


def _base_layer(module: nn.Module) -> nn.Module:
    get_base_layer = getattr(module, "get_base_layer", None)  # ours, or PEFT's layers
    return get_base_layer() if callable(get_base_layer) else module


def check_targets(model: nn.Module, layout: AdapterLayout) -> None:
    """Every module the adapter names exists in `model` and is (or wraps) an nn.Linear."""
    for module, rank in layout.ranks.items():
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(
                layout.name, f"{layout.file}: module {module!r} does not exist in the base model"
            ) from None
        base = _base_layer(target)
        if not isinstance(base, nn.Linear):
            raise AdapterError(
                layout.name,
                f"{layout.file}: module {module!r} is a {type(base).__name__}; "
                "only nn.Linear layers are served",
            )
        if rank < 1:
            raise AdapterError(layout.name, f"{layout.file}: module {module!r} has rank {rank}")


def check_shapes(model: nn.Module, layout: AdapterLayout, weights: AdapterWeights) -> None:
    """Every A [r, in] / B [out, r] fits its base layer (call `check_targets` first)."""
    for path, (a, b) in weights.modules.items():
        base = _base_layer(model.get_submodule(path))
        assert isinstance(base, nn.Linear), path
        n_in, n_out = base.in_features, base.out_features
        if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise AdapterError(
                weights.name,
                f"{layout.file}: {path} has A{tuple(a.shape)} B{tuple(b.shape)}, which do not "
                f"fit the base layer {n_in}->{n_out} (A must be [r, {n_in}], B [{n_out}, r]); "
                "was the adapter trained for a different base model?",
            )


def wrap_modules(
    model: nn.Module, modules: Sequence[str], num_slots: int, batch: LoRABatch
) -> dict[str, BatchedLoRALinear]:
    """Replace each named nn.Linear of `model` by a BatchedLoRALinear (idempotent)."""
    wrapped: dict[str, BatchedLoRALinear] = {}
    for path in modules:
        target = model.get_submodule(path)
        if isinstance(target, BatchedLoRALinear):
            wrapped[path] = target
            continue
        assert isinstance(target, nn.Linear), path
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = BatchedLoRALinear(target, num_slots, batch)
        setattr(parent, child, layer)
        wrapped[path] = layer
    return wrapped


# -- the slot manager -----------------------------------------------------------------------
@dataclass(slots=True)
class _Slot:
    name: str | None = None
    refs: int = 0  # running requests using it
    last_used: int = 0
    retiring: bool = False  # its version was replaced or removed: freed at the last release


@dataclass(slots=True)
class LoRAStats:
    hot: dict[int, str] = field(default_factory=dict)
    loads: int = 0  # adapters put into a slot
    evictions: int = 0
    disk_reads: int = 0


class LoRAManager:
    """Hot adapter slots over the wrapped model, filled on demand, LRU-evicted when unpinned.

    Not thread-safe: the engine thread calls every method except `usage`, which only copies.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, AdapterSpec],
        *,
        max_loras: int = 8,
        max_cpu_loras: int | None = None,
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        if max_cpu_loras is not None and max_cpu_loras < 1:
            raise ValueError(
                f"max_cpu_loras must be at least 1 (or None for all), got {max_cpu_loras}"
            )
        self.model = model
        self.specs = dict(adapters)
        self.layouts = {name: read_layout(spec) for name, spec in self.specs.items()}
        for layout in self.layouts.values():
            check_targets(model, layout)
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.batch = LoRABatch()
        targets = sorted({m for layout in self.layouts.values() for m in layout.ranks})
        self.layers = wrap_modules(model, targets, max_loras, self.batch)
        self._slots = [_Slot() for _ in range(max_loras)]
        self._by_name: dict[str, int] = {}
        self._cpu: collections.OrderedDict[str, AdapterWeights] = collections.OrderedDict()
        self._clock = 0
        self.last_used: dict[str, float] = {}  # name -> time.time() of its last acquire
        self.stats = LoRAStats()

    @property
    def hot(self) -> dict[int, str]:
        return {
            i: s.name for i, s in enumerate(self._slots) if s.name is not None and not s.retiring
        }

    # -- requests -------------------------------------------------------------------------
    def acquire(self, name: str) -> int | None:
        """A slot holding `name`, pinned until `release`; None while every slot is pinned.

        Raises UnknownAdapterError when `name` is not served (removed while a request waited).
        """
        if name not in self.specs:
            raise UnknownAdapterError(name, sorted(self.specs))
        self._clock += 1
        slot = self._by_name.get(name)
        if slot is None:
            slot = self._pick_victim()
            if slot is None:
                return None
            self._load(slot, name)
        entry = self._slots[slot]
        entry.refs += 1
        entry.last_used = self._clock
        self.last_used[name] = time.time()
        return slot

    def release(self, slot: int) -> None:
        entry = self._slots[slot]
        assert entry.refs > 0, f"LoRA slot {slot} released more often than acquired"
        entry.refs -= 1
        if entry.refs == 0 and entry.retiring:
            self._free(slot)

    # -- the adapter set --------------------------------------------------------------------
    def install(self, spec: AdapterSpec, layout: AdapterLayout, weights: AdapterWeights) -> None:
        """Serve `weights` under `spec.name`, replacing a served version of that name.

        `layout` and `weights` are read beforehand (`read_layout`, `load_adapter_weights`: the
        slow part, off the engine thread). Raises AdapterError, before anything changes, when
        they do not fit the model.
        """
        check_targets(self.model, layout)
        check_shapes(self.model, layout, weights)
        new = sorted(path for path in layout.ranks if path not in self.layers)
        self.layers.update(wrap_modules(self.model, new, self.max_loras, self.batch))
        name = spec.name
        if name in self.specs:
            self._retire(name)
        self.specs[name] = spec
        self.layouts[name] = layout
        self._store(name, weights)
        logger.debug(
            "LoRA %r installed (%d module(s), %d newly wrapped)", name, len(layout.ranks), len(new)
        )

    def remove(self, name: str) -> None:
        """Stop serving `name`; slots its running requests pin are freed as they finish."""
        if name not in self.specs:
            raise UnknownAdapterError(name, sorted(self.specs))
        self._retire(name)
        del self.specs[name], self.layouts[name]
        self.last_used.pop(name, None)

    def usage(self, names: Iterable[str]) -> dict[str, AdapterUsage]:
        """State and last use of each of `names` (safe from any thread: it only copies)."""
        hot, cpu, last = set(self._by_name), set(self._cpu), dict(self.last_used)
        return {
            name: AdapterUsage(
                "hot" if name in hot else "cpu" if name in cpu else "disk", last.get(name)
            )
            for name in names
        }

    def _retire(self, name: str) -> None:
        """Take the current version of `name` out: no new request gets it."""
        self._cpu.pop(name, None)
        slot = self._by_name.pop(name, None)
        if slot is None:
            return
        if self._slots[slot].refs == 0:
            self._free(slot)
        else:
            self._slots[slot].retiring = True
            self.stats.hot = self.hot

    def _free(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.reset_lora(slot)
        self._slots[slot] = _Slot()
        self.stats.hot = self.hot

    # -- slots and the CPU store -------------------------------------------------------------
    def _pick_victim(self) -> int | None:
        free = [i for i, s in enumerate(self._slots) if s.name is None]
        if free:
            return free[0]
        idle = [i for i, s in enumerate(self._slots) if s.refs == 0]
        return min(idle, key=lambda i: self._slots[i].last_used) if idle else None

    def _store(self, name: str, weights: AdapterWeights) -> None:
        self._cpu[name] = weights
        self._cpu.move_to_end(name)
        while self.max_cpu_loras is not None and len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    def _weights(self, name: str) -> AdapterWeights:
        weights = self._cpu.get(name)
        if weights is not None:
            self._cpu.move_to_end(name)
            return weights
        layout = self.layouts[name]
        weights = load_adapter_weights(self.specs[name], layout)
        self.stats.disk_reads += 1
        # read again: the file may have changed since the adapter was installed
        unwrapped = sorted(set(weights.modules) - set(self.layers))
        if unwrapped:
            raise AdapterError(
                name,
                f"{layout.file}: module {unwrapped[0]!r} was not in this file when the adapter "
                "was loaded; the file changed on disk since: load the adapter again",
            )
        check_shapes(self.model, layout, weights)
        self._store(name, weights)
        return weights

    def _load(self, slot: int, name: str) -> None:
        weights = self._weights(name)  # may raise: the slot is left as it was
        entry = self._slots[slot]
        if entry.name is not None:
            logger.debug("LoRA slot %d: evicting %r for %r", slot, entry.name, name)
            del self._by_name[entry.name]
            self.stats.evictions += 1
        for path, layer in self.layers.items():
            module = weights.modules.get(path)
            if module is None:
                layer.reset_lora(slot)
            else:
                layer.set_lora(slot, *module)
        self._slots[slot] = _Slot(name=name)
        self._by_name[name] = slot
        self.stats.loads += 1
        self.stats.hot = self.hot
