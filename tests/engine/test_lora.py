"""Batched multi-LoRA layers: the batched op equals its plain-loop oracle; adapter files, scales,
the shared refusals and file policy; the hot-slot manager's LRU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from tests.engine.tiny import TinyFamily, quiet_peft
from tuneserve.engine import lora
from tuneserve.engine.lora import (
    BatchedLoRALinear,
    LoRABatch,
    LoRAManager,
    add_lora,
    load_adapter_weights,
    lora_reference,
    read_layout,
)
from tuneserve.errors import AdapterError
from tuneserve.models.types import AdapterSpec


@pytest.fixture(params=["dense", "grouped"])
def lora_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each batched-op test runs through both forms (lora.py's docstring): the dense masked one
    and tokens grouped by slot, whichever the number of adapters in use would pick."""
    monkeypatch.setattr(lora, "GROUPED_MIN_SPREAD", 1 if request.param == "grouped" else 10**6)
    return str(request.param)


def random_layer(
    ranks: list[int], seed: int = 0, bias: bool = True
) -> tuple[BatchedLoRALinear, LoRABatch]:
    torch.manual_seed(seed)
    batch = LoRABatch()
    layer = BatchedLoRALinear(nn.Linear(24, 40, bias=bias), num_slots=len(ranks), batch=batch)
    for slot, rank in enumerate(ranks):
        if rank:
            layer.set_lora(slot, torch.randn(rank, 24), torch.randn(40, rank))
    return layer, batch


@pytest.mark.parametrize(
    "ranks, token_slots",
    [
        pytest.param([4, 0, 8, 2], [0, -1, 2, 3, 3, 0, 1, -1, 2], id="mixed-ranks-and-empty-slot"),
        pytest.param([16, 16, 16], [2, 2, 2, 2], id="one-adapter"),
        pytest.param([1], [0, -1, 0], id="rank-1"),
        pytest.param([4, 8, 2, 6], [3, -1, 1, 3, 1], id="some-hot-slots-unused"),
        pytest.param([16] * 8, [i % 8 for i in range(32)], id="eight-adapters-even-groups"),
        pytest.param([8, 16, 4, 2, 8], [4, 0, 0, 0, 1, -1, 0, 3, 2, 0], id="uneven-groups"),
    ],
)
def test_batched_op_equals_the_plain_loop(
    ranks: list[int], token_slots: list[int], lora_form: str
) -> None:
    layer, batch = random_layer(ranks)
    x = torch.randn(1, len(token_slots), 24)
    batch.set(token_slots, [], torch.device("cpu"))
    got = layer(x)[0]
    expected = layer.base_layer(x)[0] + lora_reference(x[0], token_slots, layer.slot_weights())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_the_columns_of_slots_in_use_take_part() -> None:
    layer, batch = random_layer([4, 8, 2, 6])
    batch.set([3, -1, 1, 3], [], torch.device("cpu"))
    mask = batch.mask(layer.ranks, 4, torch.float32)
    assert mask is not None and mask.shape == (4, 8 + 6)  # slots 1 and 3: their columns only
    assert mask.sum(1).tolist() == [6, 0, 8, 6]
    batch.set([0, 1, 2, 3], [], torch.device("cpu"))
    mask = batch.mask(layer.ranks, 4, torch.float32)
    assert mask is not None and mask.shape == (4, 20)
    batch.set([2, 2, 2], [], torch.device("cpu"))
    assert batch.mask(layer.ranks, 3, torch.float32) is None  # one slot for all: all ones
    batch.set([2, -1, 2], [], torch.device("cpu"))
    assert batch.mask(layer.ranks, 3, torch.float32) is not None


def test_the_form_follows_how_the_tokens_spread_over_adapters() -> None:
    batch = LoRABatch()
    assert lora.GROUPED_MIN_SPREAD == 4
    batch.set([0, 1, 2, 3, 4, 5, 6, 7] * 4, [], torch.device("cpu"))  # 32 decodes, 8 adapters
    assert batch.groups(32, torch.float32) is not None
    batch.set([0] * 8 + [1, 2, 3, 4, 5, 6] * 4, [], torch.device("cpu"))  # slot 0: 8 of 32
    assert batch.groups(32, torch.float32) is not None
    batch.set([0] * 128 + [1, 2, 3, 4, 5, 6, 7] * 4, [], torch.device("cpu"))  # a prompt on 0
    assert batch.groups(156, torch.float32) is None  # uneven: 7 groups padded to 128 rows
    batch.set([0, 1, 2] * 3, [], torch.device("cpu"))  # 3 tokens a slot of 9: more than 1/4
    assert batch.groups(9, torch.float32) is None
    batch.set([0, 1, 2, 3, 0] + [-1] * 35, [], torch.device("cpu"))
    groups = batch.groups(40, torch.float32)
    assert groups is not None and groups.shape == (4, 2)
    assert groups.slots == (0, 1, 2, 3)
    assert groups.index.tolist() == [0, 4, 1, 0, 2, 0, 3, 0]  # padding points at token 0
    assert groups.padding is not None
    assert groups.padding[:, :, 0].tolist() == [[1, 1], [1, 0], [1, 0], [1, 0]]


def test_a_repeated_step_reuses_its_plan_and_still_sees_new_weights(lora_form: str) -> None:
    """Steps that repeat the last one's slots (one user decoding) keep the layers' plans
    (`LoRABatch.epoch`); between steps no adapter applies; a slot loaded anew is seen."""
    layer, batch = random_layer([4, 8])
    x = torch.randn(1, 3, 24)
    batch.set([0, 1, 0], [], torch.device("cpu"))
    first, epoch = layer(x), batch.epoch
    batch.clear()
    assert torch.equal(layer(x), layer.base_layer(x))
    batch.set([0, 1, 0], [], torch.device("cpu"))
    assert batch.epoch == epoch and torch.equal(layer(x), first)
    layer.set_lora(1, torch.randn(8, 24), torch.randn(40, 8))  # another adapter in slot 1
    batch.set([0, 1, 0], [], torch.device("cpu"))
    expected = layer.base_layer(x)[0] + lora_reference(x[0], [0, 1, 0], layer.slot_weights())
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-5, atol=1e-5)
    batch.set([1, 1, 0], [], torch.device("cpu"))
    assert batch.epoch == epoch + 1


def test_add_lora_semantics_by_hand() -> None:
    """The docstring's loop, written out for two slots."""
    torch.manual_seed(1)
    a0, b0, a1, b1 = torch.randn(2, 5), torch.randn(3, 2), torch.randn(1, 5), torch.randn(3, 1)
    x = torch.randn(4, 5)
    slots = [1, -1, 0, 1]
    a_t = torch.cat([a0.T, a1.T], 1)  # [5, 3]
    b = torch.cat([b0.T, b1.T], 0)  # [3, 3]
    col_slot = torch.tensor([0, 0, 1])
    mask = (torch.tensor(slots)[:, None] == col_slot[None, :]).float()
    y = torch.zeros(4, 3)
    expected = torch.stack([b1 @ (a1 @ x[0]), torch.zeros(3), b0 @ (a0 @ x[2]), b1 @ (a1 @ x[3])])
    torch.testing.assert_close(add_lora(y, x, a_t, b, mask), expected)


def test_rows_without_adapter_get_the_base_output_exactly(lora_form: str) -> None:
    layer, batch = random_layer([4, 8])
    x = torch.randn(1, 6, 24)
    batch.set([-1] * 6, [], torch.device("cpu"))
    assert torch.equal(layer(x), layer.base_layer(x))
    batch.set([-1, -1, 0, -1, -1, -1], [], torch.device("cpu"))
    out = layer(x)
    assert torch.equal(out[0, [0, 1, 3, 4, 5]], layer.base_layer(x)[0, [0, 1, 3, 4, 5]])


@pytest.mark.parametrize(
    "token_slots, keep_slots",
    [
        pytest.param([0, 0, 0, 1, -1, -1], [0, 1, -1], id="same-slots"),
        # the rows on slots 2 and 3 are mid-prompt: no logits kept for them
        pytest.param([2, 2, 0, 3, 3, 1, -1], [0, 1, -1], id="kept-rows-on-fewer-slots"),
    ],
)
def test_a_module_after_logits_to_keep_uses_the_kept_rows_slots(
    token_slots: list[int], keep_slots: list[int], lora_form: str
) -> None:
    layer, batch = random_layer([4, 2, 8, 6], bias=False)
    batch.set(token_slots, keep_slots, torch.device("cpu"))
    x = torch.randn(1, 3, 24)  # one hidden state per kept row
    expected = layer.base_layer(x)[0] + lora_reference(x[0], keep_slots, layer.slot_weights())
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_reset_lora_empties_a_slot(lora_form: str) -> None:
    layer, batch = random_layer([4, 8])
    layer.reset_lora(0)
    assert layer.ranks == (0, 8)
    x = torch.randn(1, 2, 24)
    batch.set([0, 1], [], torch.device("cpu"))
    expected = layer.base_layer(x)[0] + lora_reference(x[0], [0, 1], layer.slot_weights())
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x)[0, 0], layer.base_layer(x)[0, 0])


# -- adapter files ------------------------------------------------------------------------------
def _peft_scaling(family: TinyFamily, spec: AdapterSpec, module: str) -> float:
    from peft import PeftModel

    with quiet_peft():
        model = PeftModel.from_pretrained(family.load_base(), str(spec.path))
    inner = cast(nn.Module, model.base_model.model)
    layer: Any = inner.get_submodule(module)  # a peft LoRA layer: `scaling` is a plain dict
    return float(layer.scaling["default"])


def _save_adapter(family: TinyFamily, root: Path, name: str, **config: Any) -> AdapterSpec:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(init_lora_weights=False, **config)
    with quiet_peft():
        get_peft_model(family.load_base(), lora).save_pretrained(str(root / name))
    targets = lora.target_modules
    assert targets is not None and not isinstance(targets, str)
    return AdapterSpec(
        name=name,
        path=root / name,
        rank=lora.r,
        alpha=lora.lora_alpha,
        target_modules=tuple(sorted(targets)),
        config=lora.to_dict(),
    )


@pytest.mark.parametrize(
    "config, module",
    [
        pytest.param(
            dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
            "model.layers.0.self_attn.q_proj",
            id="alpha/r",
        ),
        pytest.param(
            dict(r=8, lora_alpha=16, target_modules=["v_proj"], use_rslora=True),
            "model.layers.1.self_attn.v_proj",
            id="rslora",
        ),
        pytest.param(
            dict(
                r=4,
                lora_alpha=8,
                target_modules=["o_proj"],
                rank_pattern={"layers.1.self_attn.o_proj": 2},
                alpha_pattern={"o_proj": 5},
            ),
            "model.layers.1.self_attn.o_proj",
            id="patterns",
        ),
    ],
)
def test_scale_is_folded_into_b_as_peft_computes_it(
    tiny_llama: TinyFamily, tmp_path: Path, config: dict[str, Any], module: str
) -> None:
    from safetensors.torch import load_file

    spec = _save_adapter(tiny_llama, tmp_path, "a", **config)
    layout = read_layout(spec)
    weights = load_adapter_weights(spec, layout)
    raw = load_file(str(layout.file))
    b_raw = raw[f"base_model.model.{module}.lora_B.weight"]
    a, b = weights.modules[module]
    assert layout.ranks[module] == a.shape[0] == b_raw.shape[1]
    torch.testing.assert_close(b, b_raw * _peft_scaling(tiny_llama, spec, module))


def test_an_unsupported_variant_is_refused_with_the_shared_message(
    tiny_llama: TinyFamily, tmp_path: Path
) -> None:
    """The engine applies models/adapters.py's refusals (their wording is tested there)."""
    spec = _save_adapter(tiny_llama, tmp_path, "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    dora = replace(spec, config={**spec.config, "use_dora": True})
    with pytest.raises(AdapterError, match=r"adapter 'a': .*adapter_config.json: use_dora is true"):
        read_layout(dora)


def test_bin_weights_are_read_like_safetensors(tiny_llama: TinyFamily, tmp_path: Path) -> None:
    """One file policy for every engine: adapter_model.bin, read with weights_only=True."""
    from safetensors.torch import load_file

    spec = _save_adapter(tiny_llama, tmp_path, "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    safetensors = spec.path / "adapter_model.safetensors"
    torch.save(load_file(str(safetensors)), spec.path / "adapter_model.bin")
    expected = load_adapter_weights(spec, read_layout(spec)).modules
    safetensors.unlink()
    layout = read_layout(spec)
    assert layout.file.name == "adapter_model.bin"
    weights = load_adapter_weights(spec, layout).modules
    assert weights.keys() == expected.keys()
    for module, (a, b) in weights.items():
        torch.testing.assert_close(a, expected[module][0])
        torch.testing.assert_close(b, expected[module][1])


def test_missing_weights_file_is_named(tiny_llama: TinyFamily, tmp_path: Path) -> None:
    spec = AdapterSpec(
        name="gone",
        path=tmp_path,
        rank=4,
        alpha=8,
        target_modules=("q_proj",),
        config={"peft_type": "LORA"},
    )
    with pytest.raises(AdapterError, match="no weights in .*: expected adapter_model.safetensors"):
        read_layout(spec)


# -- the slot manager -------------------------------------------------------------------------
def test_manager_wraps_the_union_of_targets_and_evicts_least_recently_used(
    tiny_llama: TinyFamily,
) -> None:
    model = tiny_llama.load_base()
    manager = LoRAManager(model, tiny_llama.adapters, max_loras=2, max_cpu_loras=2)
    kinds = {name.rsplit(".", 1)[1] for name in manager.layers}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), BatchedLoRALinear)

    a = manager.acquire("alpha")
    b = manager.acquire("beta")
    assert {a, b} == {0, 1}
    assert a is not None and b is not None
    assert manager.acquire("gamma") is None  # both pinned: gamma waits
    manager.release(a)
    manager.acquire("beta")  # beta used again: alpha is the least recently used
    manager.release(b)
    manager.release(b)
    g = manager.acquire("gamma")
    assert g is not None
    assert g == a and manager.hot == {a: "gamma", b: "beta"}
    assert manager.stats.evictions == 1
    # gamma targets only o_proj/down_proj: slot g holds nothing at q_proj
    q = manager.layers["model.layers.0.self_attn.q_proj"]
    assert q.ranks[g] == 0 and q.ranks[b] == 8
    # the CPU store keeps at most two adapters' weights: alpha was dropped, read again
    manager.release(g)
    manager.acquire("alpha")
    assert manager.stats.disk_reads == 4


def test_manager_refuses_adapters_for_missing_modules(
    tiny_llama: TinyFamily, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from tests.engine.tiny import tiny_config

    config = tiny_config("llama", tiny_llama.tokenizer)
    config.num_hidden_layers = 1  # the adapters were made for two layers
    small = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        AdapterError, match="module 'model.layers.1.self_attn.q_proj' does not exist"
    ):
        LoRAManager(small, {"alpha": tiny_llama.adapters["alpha"]})


def test_manager_retires_a_replaced_or_removed_version_only_when_unpinned(
    tiny_llama: TinyFamily,
) -> None:
    from tuneserve.engine.types import AdapterUsage
    from tuneserve.errors import UnknownAdapterError

    model = tiny_llama.load_base()
    manager = LoRAManager(model, {}, max_loras=2)
    assert manager.layers == {}  # nothing to wrap until an adapter arrives
    alpha, gamma = tiny_llama.adapters["alpha"], tiny_llama.adapters["gamma"]

    def install(spec: AdapterSpec) -> None:
        layout = read_layout(spec)
        manager.install(spec, layout, load_adapter_weights(spec, layout))

    install(alpha)
    assert manager.usage(["alpha"]) == {"alpha": AdapterUsage("cpu", None)}
    pinned = manager.acquire("alpha")
    assert pinned is not None and manager.usage(["alpha"])["alpha"].state == "hot"
    # a new version under the same name while a request runs on the old one
    install(alpha)
    q = manager.layers["model.layers.0.self_attn.q_proj"]
    assert manager.hot == {} and q.ranks[pinned] == 4  # retiring, weights kept
    fresh = manager.acquire("alpha")
    assert fresh is not None and fresh != pinned
    manager.release(pinned)
    assert q.ranks[pinned] == 0 and manager.hot == {fresh: "alpha"}
    # new targets are wrapped on arrival; remove frees an idle slot at once
    install(gamma)
    assert "model.layers.0.mlp.down_proj" in manager.layers
    manager.release(fresh)
    manager.remove("alpha")
    assert manager.hot == {} and not any(q.ranks)
    with pytest.raises(UnknownAdapterError, match="'alpha'"):
        manager.acquire("alpha")
    with pytest.raises(UnknownAdapterError):
        manager.remove("alpha")
