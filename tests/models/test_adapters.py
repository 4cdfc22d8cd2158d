"""models/adapters.py, the PEFT adapter rules: the config schema, pattern lookup and scale, the
refusals' messages, the weights' keys and the .bin policy; then validate_adapter on real PEFT
folders, where each way an adapter can be unusable gets a clear error."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tuneserve.errors import AdapterError
from tuneserve.models.adapters import (
    LoraAdapterConfig,
    check_supported,
    lora_pairs,
    parse_adapter_config,
    pattern_value,
    read_shapes,
    read_tensors,
    validate_adapter,
    weights_file,
)

PEFT_KEY = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
CONFIG = Path("adapters") / "x" / "adapter_config.json"  # a file named in messages only


def tiny_llama(hidden: int = 32, layers: int = 2, name: str = "tiny-base") -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = name
    return model


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_llama()


MakeAdapter = Callable[..., Path]


@pytest.fixture
def make_adapter(tmp_path: Path) -> MakeAdapter:
    """Save a real PEFT LoRA adapter for a tiny base and return its folder."""
    from peft import LoraConfig, get_peft_model

    def make(
        name: str = "good",
        *,
        base_model: Any = None,
        safe: bool = True,
        **lora: Any,
    ) -> Path:
        lora.setdefault("r", 4)
        lora.setdefault("lora_alpha", 8)
        lora.setdefault("target_modules", ["q_proj", "v_proj"])
        model = base_model if base_model is not None else tiny_llama()
        with warnings.catch_warnings():
            # peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        folder = tmp_path / name
        peft_model.save_pretrained(
            str(folder), safe_serialization=safe, save_embedding_layers=False
        )
        return folder

    return make


def edit_config(folder: Path, **changes: Any) -> Path:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))
    return file


def expect_error(name: str, folder: Path, model: Any, *fragments: str) -> str:
    with pytest.raises(AdapterError) as caught:
        validate_adapter(name, folder, model)
    message = str(caught.value)
    assert caught.value.adapter == name
    assert f"adapter {name!r}" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_a_good_adapter_passes(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    spec = validate_adapter("good", folder, base)
    assert (spec.name, spec.path, spec.rank, spec.alpha) == ("good", folder, 4, 16)
    assert sorted(spec.target_modules) == ["down_proj", "q_proj", "v_proj"]
    assert spec.config["peft_type"] == "LORA"


def test_bin_weights_pass(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter(safe=False)
    assert (folder / "adapter_model.bin").is_file()
    assert validate_adapter("legacy", folder, base).rank == 4


def test_a_bin_that_would_run_code_is_refused(make_adapter: MakeAdapter, base: Any) -> None:
    """weights_only=True: a pickle of anything but tensors is a bad file, never executed."""
    folder = make_adapter(safe=False)
    weights = folder / "adapter_model.bin"
    torch.save({"payload": _Exploit()}, weights)
    expect_error("pickle", folder, base, str(weights), "corrupt or not a PEFT weights file")


def test_rank_pattern_is_honoured(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter(r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    spec = validate_adapter("patterned", folder, base)
    config = LoraAdapterConfig.model_validate(spec.config)
    assert config.scale_for("model.layers.0.self_attn.v_proj") == 3.0  # 6 / 2
    assert config.scale_for("model.layers.0.self_attn.q_proj") == 2.0  # 8 / 4
    # Without the pattern, v_proj's rank-2 tensors no longer fit the declared rank 4.
    edit_config(folder, rank_pattern={})
    expect_error(
        "patterned",
        folder,
        base,
        str(folder / "adapter_model.safetensors"),
        "v_proj",
        "has shape [2, 32]",
        "needs [4, 32]",
        "its rank is 2 but adapter_config.json says r=4",
    )


def test_missing_folder(tmp_path: Path, base: Any) -> None:
    expect_error("ghost", tmp_path / "nowhere", base, str(tmp_path / "nowhere"), "does not exist")


def test_missing_config(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter()
    (folder / "adapter_config.json").unlink()
    expect_error("noconf", folder, base, str(folder / "adapter_config.json"), "missing")


def test_malformed_config(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    expect_error("broken", folder, base, str(folder / "adapter_config.json"), "not valid JSON")


def test_config_field_of_the_wrong_type(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter()
    edit_config(folder, r="eight")
    expect_error("typo", folder, base, str(folder / "adapter_config.json"), "'r'", "'eight'")


def test_not_a_lora_adapter(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter()
    edit_config(folder, peft_type="PREFIX_TUNING")
    expect_error("prefix", folder, base, str(folder / "adapter_config.json"), "PREFIX_TUNING")


def test_dora_is_refused(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter(use_dora=True)
    expect_error("dora", folder, base, str(folder / "adapter_config.json"), "use_dora")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"bias": "all"}, "bias", id="bias"),
        pytest.param({"modules_to_save": ["lm_head"]}, "modules_to_save", id="modules-to-save"),
    ],
)
def test_unsupported_options(
    make_adapter: MakeAdapter, base: Any, changes: dict[str, Any], field: str
) -> None:
    folder = make_adapter()
    edit_config(folder, **changes)
    expect_error("odd", folder, base, str(folder / "adapter_config.json"), field)


def test_target_module_not_in_the_base(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter()
    edit_config(folder, target_modules=["q_proj", "c_attn"])
    message = expect_error(
        "gpt2ish", folder, base, str(folder / "adapter_config.json"), "c_attn", "q_proj"
    )
    assert "'q_proj'" not in message.split("layers are named")[0]  # only the missing one


def test_missing_weights(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter()
    (folder / "adapter_model.safetensors").unlink()
    expect_error("noweights", folder, base, str(folder), "adapter_model.safetensors")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"this is not a safetensors file", id="garbage"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
    ],
)
def test_corrupt_weights(
    make_adapter: MakeAdapter, base: Any, damage: Callable[[bytes], bytes]
) -> None:
    folder = make_adapter()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    expect_error("corrupt", folder, base, str(weights), "corrupt")


def test_adapter_for_a_wider_base(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter(base_model=tiny_llama(hidden=48, name="wide-base"))
    expect_error(
        "wide",
        folder,
        base,
        str(folder / "adapter_model.safetensors"),
        "has shape [4, 48]",
        "needs [4, 32]",
        "'wide-base'",
    )


def test_adapter_for_a_deeper_base(make_adapter: MakeAdapter, base: Any) -> None:
    folder = make_adapter(base_model=tiny_llama(layers=3))
    expect_error(
        "deep",
        folder,
        base,
        str(folder / "adapter_model.safetensors"),
        "model.layers.2.self_attn",
        "does not exist",
    )


def test_a_lone_lora_a_is_refused(make_adapter: MakeAdapter, base: Any) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_adapter()
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    del tensors[dropped]
    save_file(tensors, str(weights))
    expect_error("half", folder, base, str(weights), "no lora_B")


def test_a_different_base_name_only_warns(
    make_adapter: MakeAdapter, base: Any, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_adapter()
    edit_config(folder, base_model_name_or_path="someone/else")
    with caplog.at_level(logging.WARNING, logger="tuneserve.models.adapters"):
        spec = validate_adapter("moved", folder, base)
    assert spec.name == "moved"
    assert "someone/else" in caplog.text and "tiny-base" in caplog.text


def test_same_base_under_a_longer_path_does_not_warn(
    make_adapter: MakeAdapter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_adapter()
    edit_config(folder, base_model_name_or_path="org/model")
    model = tiny_llama(name=str(tmp_path / "model-cache" / "org" / "model"))
    with caplog.at_level(logging.WARNING, logger="tuneserve.models.adapters"):
        validate_adapter("mounted", folder, model)
    assert caplog.text == ""


def test_copied_folder_still_validates(
    make_adapter: MakeAdapter, base: Any, tmp_path: Path
) -> None:
    """Only the two PEFT files matter: the README PEFT writes is optional."""
    folder = make_adapter()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(folder / name, copy / name)
    assert validate_adapter("copy", copy, base).path == copy


def test_validates_against_a_model_peft_already_wraps(make_adapter: MakeAdapter) -> None:
    """An engine may inject PEFT layers into the base in place, then load more adapters."""
    from peft import LoraConfig, get_peft_model

    first = make_adapter("first", target_modules=["q_proj", "v_proj"])
    second = make_adapter("second", r=2, target_modules=["q_proj", "o_proj"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        wrapped = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    for model in (wrapped, wrapped.get_base_model()):
        assert validate_adapter("first", first, model).rank == 4
        assert validate_adapter("second", second, model).rank == 2


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("a .bin adapter ran code",))


# -- the config: schema, patterns, scale -------------------------------------------------------
def test_config_defaults_are_peft_s() -> None:
    config = LoraAdapterConfig.model_validate({"peft_type": "LORA"})
    assert (config.r, config.lora_alpha, config.use_rslora, config.bias) == (8, 8, False, "none")
    assert config.targets == ()
    assert config.scale_for("model.layers.0.self_attn.q_proj") == 1.0


def test_config_as_peft_holds_it_in_memory_parses() -> None:
    """LoraConfig.to_dict(): peft_type an enum, target_modules a set (specs built by hand)."""
    from peft import LoraConfig

    raw = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_dict()
    config = parse_adapter_config("x", CONFIG, raw)
    assert config.peft_type == "LORA"
    assert sorted(config.targets) == ["q_proj", "v_proj"]
    check_supported("x", CONFIG, config)


def test_config_target_modules_as_one_regex() -> None:
    config = LoraAdapterConfig.model_validate({"peft_type": "LORA", "target_modules": ".*proj"})
    assert config.targets == (".*proj",)


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        pytest.param({"r": 4}, ["field 'peft_type'", "Field required"], id="missing"),
        pytest.param({"peft_type": "LORA", "r": 0}, ["field 'r' = 0"], id="rank-zero"),
        pytest.param(
            {"peft_type": "LORA", "rank_pattern": {"v_proj": "two"}},
            ["field 'rank_pattern.v_proj' = 'two'"],
            id="pattern-value",
        ),
    ],
)
def test_config_errors_name_the_file_and_field(raw: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(AdapterError) as caught:
        parse_adapter_config("x", CONFIG, raw)
    assert str(caught.value).startswith(f"adapter 'x': {CONFIG}: field ")
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("patterns", "module", "expected"),
    [
        pytest.param({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 2, id="last-name"),
        pytest.param({"proj": 2}, "model.layers.0.self_attn.v_proj", 8, id="not-a-part-name"),
        pytest.param(
            {"layers.1.self_attn.o_proj": 2},
            "model.layers.1.self_attn.o_proj",
            2,
            id="dotted-suffix",
        ),
        pytest.param(
            {"layers.1.self_attn.o_proj": 2},
            "model.layers.11.self_attn.o_proj",
            8,
            id="dotted-suffix-other-layer",
        ),
        pytest.param(
            {r"layers\.[01]\..*q_proj": 2}, "model.layers.0.self_attn.q_proj", 2, id="regex"
        ),
        pytest.param(
            {"q_proj": 2, ".*proj": 3}, "model.layers.0.self_attn.q_proj", 2, id="first-match-wins"
        ),
    ],
)
def test_pattern_lookup_is_peft_s(patterns: dict[str, int], module: str, expected: int) -> None:
    from peft.utils.other import get_pattern_key

    assert pattern_value(patterns, module, 8) == expected
    key = get_pattern_key(list(patterns), module)
    assert patterns.get(key, 8) == expected  # PEFT's own lookup agrees


@pytest.mark.parametrize(
    ("fields", "module", "scale"),
    [
        pytest.param({"r": 4, "lora_alpha": 8}, "q_proj", 2.0, id="alpha/r"),
        pytest.param({"r": 16, "lora_alpha": 8, "use_rslora": True}, "q_proj", 2.0, id="rslora"),
        pytest.param(
            {
                "r": 4,
                "lora_alpha": 8,
                "rank_pattern": {"v_proj": 2},
                "alpha_pattern": {"v_proj": 6},
            },
            "v_proj",
            3.0,
            id="patterns",
        ),
        pytest.param(
            {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 16}, "use_rslora": True},
            "v_proj",
            2.0,
            id="rslora-rank-pattern",
        ),
    ],
)
def test_scale(fields: dict[str, Any], module: str, scale: float) -> None:
    config = LoraAdapterConfig.model_validate({"peft_type": "LORA", **fields})
    assert config.scale_for(f"model.layers.0.self_attn.{module}") == scale


# -- the refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        pytest.param(
            "peft_type",
            "IA3",
            'peft_type is "IA3": only LoRA adapters are served (accepted: "LORA")',
            id="peft_type",
        ),
        pytest.param(
            "use_dora",
            True,
            "use_dora is true: DoRA adapters are not supported; retrain as "
            "plain LoRA (accepted: false)",
            id="use_dora",
        ),
        pytest.param(
            "bias",
            "all",
            'bias is "all": trained biases are not supported (accepted: "none")',
            id="bias",
        ),
        pytest.param(
            "lora_bias",
            True,
            "lora_bias is true: LoRA biases are not supported (accepted: false)",
            id="lora_bias",
        ),
        pytest.param(
            "modules_to_save",
            ["lm_head"],
            'modules_to_save is ["lm_head"]: adapters that '
            "replace whole modules cannot be applied per request (accepted: null or [])",
            id="modules_to_save",
        ),
        pytest.param(
            "target_parameters",
            ["experts.w1"],
            'target_parameters is ["experts.w1"]: LoRA on '
            "raw parameters is not supported, only on target_modules (accepted: null or [])",
            id="target_parameters",
        ),
        pytest.param(
            "trainable_token_indices",
            [3, 4],
            "trainable_token_indices is [3, 4]: trained "
            "token embeddings are not supported (accepted: null)",
            id="trainable_token_indices",
        ),
    ],
)
def test_each_refusal_names_the_file_field_value_and_what_is_accepted(
    field: str, value: Any, message: str
) -> None:
    config = LoraAdapterConfig.model_validate({"peft_type": "LORA", field: value})
    with pytest.raises(AdapterError) as caught:
        check_supported("x", CONFIG, config)
    assert str(caught.value) == f"adapter 'x': {CONFIG}: {message}"


def test_what_peft_writes_by_default_is_not_refused() -> None:
    config = {"peft_type": "LORA", "bias": "none", "modules_to_save": [], "use_dora": False}
    check_supported("x", CONFIG, LoraAdapterConfig.model_validate(config))


# -- the weights -----------------------------------------------------------------------------------
def test_weight_keys_pair_up_by_module() -> None:
    shapes = {
        PEFT_KEY.format("q_proj", "A"): (4, 32),
        PEFT_KEY.format("q_proj", "B"): (32, 4),
        "base_model.model.model.embed_tokens.lora_embedding_A": (4, 64),
        "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4),
    }
    pairs = lora_pairs("x", Path("w"), shapes)
    assert set(pairs) == {"model.layers.0.self_attn.q_proj", "model.embed_tokens"}
    q = pairs["model.layers.0.self_attn.q_proj"]
    assert (q.a, q.b) == ((4, 32), (32, 4))
    assert q.keys == (PEFT_KEY.format("q_proj", "A"), PEFT_KEY.format("q_proj", "B"))


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        pytest.param([PEFT_KEY.format("q_proj", "A")], "has no lora_B weight", id="lone-A"),
        pytest.param([PEFT_KEY.format("q_proj", "B")], "has no lora_A weight", id="lone-B"),
        pytest.param(
            ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"],
            "unexpected tensor",
            id="adapter-name-kept",
        ),
        pytest.param(
            ["model.layers.0.self_attn.q_proj.lora_A.weight"], "unexpected tensor", id="no-prefix"
        ),
        pytest.param(
            ["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"],
            "unexpected tensor",
            id="dora-magnitude",
        ),
        pytest.param([], "holds no tensors", id="empty"),
    ],
)
def test_weight_keys_that_are_refused(keys: list[str], fragment: str) -> None:
    with pytest.raises(AdapterError, match=fragment):
        lora_pairs("x", Path("w"), {key: (4, 32) for key in keys})


def test_safetensors_is_read_before_bin(make_adapter: MakeAdapter) -> None:
    folder = make_adapter()
    assert weights_file("x", folder).name == "adapter_model.safetensors"
    torch.save(
        read_tensors("x", folder / "adapter_model.safetensors"), folder / "adapter_model.bin"
    )
    assert weights_file("x", folder).name == "adapter_model.safetensors"
    (folder / "adapter_model.safetensors").unlink()
    assert weights_file("x", folder).name == "adapter_model.bin"


def test_bin_and_safetensors_read_the_same(make_adapter: MakeAdapter) -> None:
    folder = make_adapter()
    tensors = read_tensors("x", folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    from_bin = read_tensors("x", folder / "adapter_model.bin")
    assert from_bin.keys() == tensors.keys()
    for key, tensor in tensors.items():
        torch.testing.assert_close(from_bin[key], tensor)
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    assert read_shapes("x", folder / "adapter_model.bin") == shapes
    assert read_shapes("x", folder / "adapter_model.safetensors") == shapes


@pytest.mark.parametrize(
    ("content", "why"),
    [
        pytest.param(
            lambda: torch.zeros(2), "it holds a Tensor, not a dict of tensors", id="tensor"
        ),
        pytest.param(
            lambda: {"w": torch.zeros(2), "step": 3}, "its 'step' is a int, not a tensor", id="int"
        ),
    ],
)
def test_a_bin_that_is_not_a_dict_of_tensors_is_refused(
    tmp_path: Path, content: Callable[[], Any], why: str
) -> None:
    file = tmp_path / "adapter_model.bin"
    torch.save(content(), file)
    with pytest.raises(AdapterError) as caught:
        read_tensors("x", file)
    assert f"cannot read {file}: {why}. The file is corrupt" in str(caught.value)
