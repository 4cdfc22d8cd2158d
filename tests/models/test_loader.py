"""load_served_model: what the engine and server get, and errors a user can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tuneserve.errors import AdapterError, ModelLoadError
from tuneserve.models.chat_template import DEFAULT_CHAT_TEMPLATE
from tuneserve.models.demo import DemoPaths
from tuneserve.models.loader import (
    MAX_CONTEXT_CAP,
    load_served_model,
    load_weights,
    read_served_model,
)
from tuneserve.models.types import LoadedModel


def test_loads_the_demo_ready_to_serve(demo_paths: DemoPaths) -> None:
    served = load_served_model(str(demo_paths.base), dict(demo_paths.adapters))

    assert served.base_name == "base"  # the folder's name
    assert served.base_path == str(demo_paths.base)
    assert (served.device, served.dtype) == ("cpu", "float32")  # auto on a CPU machine
    assert not served.model.training
    assert not any(p.requires_grad for p in served.model.parameters())
    assert served.eos_token_ids == (served.tokenizer.convert_tokens_to_ids("<|end|>"),)
    assert served.max_model_len == 1024  # the config's max_position_embeddings
    assert served.tokenizer.padding_side == "left"
    assert sorted(served.adapters) == ["capitals", "pirate"]
    assert served.adapters["pirate"].path == demo_paths.adapters["pirate"]
    assert served.adapter_errors == {}


def test_options_override_the_defaults(demo_paths: DemoPaths) -> None:
    served = load_served_model(
        str(demo_paths.base),
        {},
        dtype="bfloat16",
        device="cpu",
        max_model_len=256,
        served_model_name="tiny-chat",
    )
    assert (served.base_name, served.max_model_len, served.dtype) == ("tiny-chat", 256, "bfloat16")
    assert next(served.model.parameters()).dtype == torch.bfloat16


def test_a_bad_adapter_is_recorded_and_the_rest_served(
    demo_paths: DemoPaths, tmp_path: Path
) -> None:
    adapters = {"capitals": demo_paths.adapters["capitals"], "gone": tmp_path / "gone"}
    served = load_served_model(str(demo_paths.base), adapters, device="cpu")
    assert list(served.adapters) == ["capitals"]
    assert "adapter 'gone'" in served.adapter_errors["gone"]
    assert str(tmp_path / "gone") in served.adapter_errors["gone"]


def test_reading_loads_no_weights_and_loading_them_checks_the_adapters_fit(
    demo_paths: DemoPaths, tmp_path: Path
) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(demo_paths.adapters["pirate"], odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["nope"]}))
    adapters = {"capitals": demo_paths.adapters["capitals"], "odd": odd}

    served = read_served_model(str(demo_paths.base), adapters, device="cpu")
    assert not isinstance(served, LoadedModel)  # an engine may load its model its own way
    assert sorted(served.adapters) == ["capitals", "odd"]  # the fit needs the model
    assert served.eos_token_ids == (served.tokenizer.convert_tokens_to_ids("<|end|>"),)

    loaded = load_weights(served)
    assert sorted(loaded.adapters) == sorted(served.adapters) == ["capitals"]
    assert "target_modules ['nope'] match no layer" in served.adapter_errors["odd"]
    assert loaded.adapter_errors is served.adapter_errors  # what the server reports


def test_an_adapter_may_not_take_the_base_name(demo_paths: DemoPaths) -> None:
    with pytest.raises(AdapterError, match="same name as the base model 'base'"):
        load_served_model(str(demo_paths.base), {"base": demo_paths.adapters["pirate"]})
    with pytest.raises(AdapterError, match="--served-model-name"):
        load_served_model(
            str(demo_paths.base), {"demo": demo_paths.adapters["pirate"]}, served_model_name="demo"
        )


def test_missing_base_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_served_model(str(tmp_path / "no" / "such" / "model"), {})
    assert str(tmp_path / "no" / "such" / "model") in str(caught.value)


def test_base_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_served_model(str(tmp_path), {})
    with pytest.raises(ModelLoadError, match="is a file"):
        load_served_model(str(tmp_path / "weights.safetensors"), {})


def test_a_hub_id_that_is_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # also set by conftest; never reach the network
    with pytest.raises(ModelLoadError) as caught:
        load_served_model("tuneserve-tests/no-such-model", {})
    message = str(caught.value)
    assert "'tuneserve-tests/no-such-model'" in message
    assert "Hugging Face cache" in message and "--base" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPU")
def test_cuda_without_a_gpu(demo_paths: DemoPaths) -> None:
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_served_model(str(demo_paths.base), {}, device="cuda")


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder as some hubs ship them: no chat template, no pad token, several EOS ids
    in generation_config, and a context far beyond what a server should reserve by default."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("bare-model")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100, special_tokens=["<unk>", "<s>", "</s>", "<|eot|>"], show_progress=False
    )
    tok.train_from_iterator(["hello world", "a tiny model"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=131072,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[3, 2])  # <|eot|>, </s>
    model.save_pretrained(folder)
    return folder


def test_a_bare_model_gets_usable_defaults(bare_model: Path) -> None:
    served = load_served_model(str(bare_model), {})
    tokenizer = served.tokenizer
    assert served.max_model_len == MAX_CONTEXT_CAP
    assert served.eos_token_ids == (3, 2)  # generation_config's order, tokenizer's EOS not repeated
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
