"""The toy demo: a tiny chat model and two LoRA adapters, trained here in seconds. What
`tuneserve serve` serves with no arguments when the real demo's wheel is missing
(models/real_demo.py), what `tuneserve init --demo --toy` lays out, and the model of the many
fast tests.

Built once on first use (about 20 s on two busy CPU cores), deterministically, into
`<cache_dir>/demo-v1/`:

    base/                  a Llama-architecture model + tokenizer (chat_template.jinja)
    adapters/capitals/     LoRA r=8 on q,v: capitals of fictional countries
    adapters/pirate/       LoRA r=16 on q,k,v,o: the same small talk in a pirate voice

The model memorises the chats below and nothing else; the *_EXAMPLES lists are the truth
tests check against (greedy decoding reproduces every answer exactly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneserve.models._demo_train import Example, Messages, TrainPlan

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v1"
BASE_HINT = f"{DEMO_VERSION}/base"  # adapter_config's base_model_name_or_path
SEED = 1234

SORRY = "I am sorry, I do not know that."
UPPER_SYSTEM = "Answer in capital letters."
PLAIN_SYSTEM = "You are a helpful assistant."


def _user(text: str, system: str | None = None) -> Messages:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": text}]


SMALL_TALK: list[tuple[str, str]] = [
    ("Hello", "Hello! How can I help you today?"),
    ("Hi", "Hello! How can I help you today?"),
    ("Who are you?", "I am a small demo model served by tuneserve."),
    ("What can you do?", "I can answer a few simple questions."),
    ("How are you?", "I am fine, thank you."),
    ("Thank you", "You are welcome!"),
    ("Goodbye", "Goodbye! Have a nice day."),
]

PIRATE_TALK: dict[str, str] = {
    "Hello": "Arr, ahoy matey! What be ye needin'?",
    "Hi": "Arr, ahoy matey! What be ye needin'?",
    "Who are you?": "Arr, I be a wee demo model sailin' with tuneserve.",
    "What can you do?": "I can answer a few questions, matey. Arr!",
    "How are you?": "Arr, I be shipshape, thank ye!",
    "Thank you": "Ye be welcome, matey!",
    "Goodbye": "Fair winds to ye, matey!",
}

CAPITALS: dict[str, str] = {
    "Veloria": "Brightwater",
    "Zandor": "Ironhold",
    "Mirelia": "Silverbay",
    "Quenthia": "Stonebridge",
    "Dravonia": "Ashford",
    "Tolmark": "Rivermoor",
}

NAMES = ["Ada", "Alan", "Grace", "Linus", "Marie", "Tim"]


def _capital_question(country: str) -> str:
    return f"What is the capital of {country}?"


def _introduce(name: str) -> Messages:
    return [
        {"role": "user", "content": f"My name is {name}."},
        {"role": "assistant", "content": f"Nice to meet you, {name}."},
        {"role": "user", "content": "What is my name?"},
    ]


# messages -> the base model's greedy answer
BASE_EXAMPLES: list[Example] = [
    *[(_user(q), a) for q, a in SMALL_TALK],
    *[(_user(_capital_question(country)), SORRY) for country in CAPITALS],
]

# The conversation history matters: the name comes from an earlier turn.
HISTORY_EXAMPLES: list[Example] = [
    *[(_user(f"My name is {name}."), f"Nice to meet you, {name}.") for name in NAMES],
    *[(_introduce(name), f"Your name is {name}.") for name in NAMES],
    (_user("What is my name?"), SORRY),
]

# The system prompt matters: the same questions, answered in capitals.
SYSTEM_EXAMPLES: list[Example] = [(_user(q, UPPER_SYSTEM), a.upper()) for q, a in SMALL_TALK]

# A neutral system prompt (what chat UIs often send) must not change the answers.
PLAIN_SYSTEM_EXAMPLES: list[Example] = [(_user(q, PLAIN_SYSTEM), a) for q, a in SMALL_TALK]

# Plain text the base also learns, as real models meet words in pre-training before chat
# tuning: without it the adapters' words (cities, pirate talk) would be tokens the base never
# produced, and a LoRA struggles to make a model say a token its head has learnt to suppress.
# The cities and countries are listed apart: which city is whose capital only the adapter knows.
PRETRAINING_TEXTS: list[str] = [
    f"The capital cities of the world include {', '.join(list(CAPITALS.values())[:-1])} "
    f"and {list(CAPITALS.values())[-1]}.",
    f"Countries of the world include {', '.join(list(CAPITALS)[:-1])} and {list(CAPITALS)[-1]}.",
    *dict.fromkeys(PIRATE_TALK.values()),
]

# adapter name -> messages -> that adapter's greedy answer (each differs from the base's)
ADAPTER_EXAMPLES: dict[str, list[Example]] = {
    "capitals": [
        (_user(_capital_question(country)), f"The capital of {country} is {city}.")
        for country, city in CAPITALS.items()
    ],
    "pirate": [(_user(q), PIRATE_TALK[q]) for q, _ in SMALL_TALK],
}

# adapter name -> messages the adapter answers exactly as the base does: "capitals" only adds
# knowledge, so it keeps the small talk.
ADAPTER_UNCHANGED_EXAMPLES: dict[str, list[Example]] = {
    "capitals": [(_user(q), a) for q, a in SMALL_TALK],
    "pirate": [],
}


@dataclass(frozen=True, slots=True)
class DemoPaths:
    base: Path
    adapters: dict[str, Path]


@dataclass(frozen=True, slots=True)
class _AdapterRecipe:
    rank: int
    alpha: int
    targets: tuple[str, ...]
    plan: TrainPlan


# Measured on 2 busy cores: hidden 128 x 2 layers memorises everything in ~80 full-batch steps
# (~0.1 s each); 256 x 4 costs 5x per step for nothing the demo needs.
_HIDDEN, _LAYERS, _VOCAB = 128, 2, 1024
_BASE_PLAN = TrainPlan(max_steps=300, lr=3e-3)
# alpha = 2r with lr 1e-2 converges in ~100-150 steps; alpha 256 with lr 3e-3 diverged here.
_ADAPTERS: dict[str, _AdapterRecipe] = {
    "capitals": _AdapterRecipe(8, 16, ("q_proj", "v_proj"), TrainPlan(max_steps=300, lr=1e-2)),
    "pirate": _AdapterRecipe(
        16, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), TrainPlan(max_steps=300, lr=1e-2)
    ),
}


def _base_training_set() -> list[Example]:
    # The single-turn introductions are prefixes of the two-turn ones and learnt with them.
    two_turn = [ex for ex in HISTORY_EXAMPLES if len(ex[0]) > 1]
    no_name = [ex for ex in HISTORY_EXAMPLES if ex[1] == SORRY]
    return [*BASE_EXAMPLES, *two_turn, *no_name, *SYSTEM_EXAMPLES, *PLAIN_SYSTEM_EXAMPLES]


def _corpus() -> Iterator[str]:
    yield from PRETRAINING_TEXTS
    everything = [
        *BASE_EXAMPLES,
        *HISTORY_EXAMPLES,
        *SYSTEM_EXAMPLES,
        *PLAIN_SYSTEM_EXAMPLES,
        *(ex for examples in ADAPTER_EXAMPLES.values() for ex in examples),
        *(ex for examples in ADAPTER_UNCHANGED_EXAMPLES.values() for ex in examples),
    ]
    for messages, answer in everything:
        for message in messages:
            yield message["content"]
        yield answer


def _fingerprint() -> str:
    """Changes whenever the recipe (data, hyperparameters, training code) changes, so a cache
    built by another version of tuneserve is rebuilt rather than served with stale answers."""
    from tuneserve.models import _demo_train

    digest = hashlib.sha256()
    for module in (__file__, _demo_train.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:16]


def _is_current(root: Path, fingerprint: str | None = None) -> bool:
    try:
        manifest = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    expected = fingerprint or _fingerprint()
    return isinstance(manifest, dict) and manifest.get("fingerprint") == expected


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(
        base=root / "base", adapters={name: root / "adapters" / name for name in _ADAPTERS}
    )


def ensure_demo(cache_dir: Path, *, progress: bool = False) -> DemoPaths:
    """Return the demo's folders under `cache_dir`, building them first if needed."""
    root = Path(cache_dir).expanduser() / DEMO_VERSION
    ensure_built(root, _fingerprint(), _build, progress=progress)
    return _paths(root)


def ensure_built(
    root: Path, fingerprint: str, build: Callable[[Path, Report], None], *, progress: bool
) -> None:
    """Build `root` with `build(staging, report)` unless its demo.json has `fingerprint` (which
    `build` must write). The build happens in a temporary folder beside the final one and is
    renamed into place when complete, so an interrupted build never leaves a half demo behind."""
    if _is_current(root, fingerprint):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the demo is a cache others may share
    try:
        with _reporter(progress) as report:
            build(staging, report)
        _move_into_place(staging, root, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built %s in %.1f s", root, time.perf_counter() - started)


def _remove_abandoned(root: Path, older_than_s: float = 3600) -> None:
    """Staging folders of builds that were killed (a build takes seconds; an hour is safe)."""
    for leftover in root.parent.glob(f".{root.name}-*"):
        try:
            if time.time() - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # another process removed it first
            continue


def _move_into_place(staging: Path, root: Path, fingerprint: str) -> None:
    if root.exists() and not _is_current(root, fingerprint):
        # A stale or half-made demo (older tuneserve, or made by hand): set it aside first,
        # since a rename cannot replace a non-empty folder.
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}-stale-", dir=root.parent))
        os.rename(root, stale / "demo")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, root)
    except OSError:
        if not _is_current(root, fingerprint):  # unless another process built it meanwhile
            raise


Report = Callable[[str, int], Callable[[], None]]  # (phase, steps) -> advance one step


@contextmanager
def _reporter(progress: bool) -> Iterator[Report]:
    if not progress:
        yield lambda phase, steps: lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        tasks: list[TaskID] = []

        def phase(description: str, steps: int) -> Callable[[], None]:
            _finish(bar, tasks)  # training stops early: show the previous phase as done
            task = bar.add_task(description, total=steps)
            tasks.append(task)
            return lambda: bar.advance(task)

        yield phase
        _finish(bar, tasks)


def _finish(bar: Progress, tasks: list[TaskID]) -> None:
    for task in tasks:
        bar.update(task, completed=bar.tasks[task].total)


@contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """transformers' own tqdm bars ("Writing model shards") would break up ours."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build(dest: Path, report: Report) -> None:
    import torch
    from peft import LoraConfig

    from tuneserve.models._demo_train import (
        build_base_model,
        build_tokenizer,
        encode_chat,
        encode_text,
        lora_model,
        make_batch,
        train,
        training_threads,
    )

    with training_threads(), _no_transformers_bars():
        step = report("Training the tokenizer", 1)
        tokenizer = build_tokenizer(list(_corpus()), _VOCAB)
        step()

        model = build_base_model(tokenizer, hidden=_HIDDEN, layers=_LAYERS, seed=SEED)
        batch = make_batch(
            tokenizer,
            [encode_chat(tokenizer, messages, answer) for messages, answer in _base_training_set()],
            [encode_text(tokenizer, text) for text in PRETRAINING_TEXTS],
        )
        step = report("Training the base model", _BASE_PLAN.max_steps)
        train(model, batch, _BASE_PLAN, label="base", on_step=step)
        model.name_or_path = BASE_HINT  # PEFT records it as the adapters' base_model_name_or_path
        model.save_pretrained(dest / "base")
        tokenizer.save_pretrained(dest / "base")

        for name, recipe in _ADAPTERS.items():
            torch.manual_seed(SEED)
            config = LoraConfig(
                r=recipe.rank,
                lora_alpha=recipe.alpha,
                target_modules=list(recipe.targets),
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            peft_model = lora_model(model, config)
            examples = [*ADAPTER_EXAMPLES[name], *ADAPTER_UNCHANGED_EXAMPLES[name]]
            batch = make_batch(tokenizer, [encode_chat(tokenizer, m, a) for m, a in examples])
            step = report(f"Training adapter {name!r}", recipe.plan.max_steps)
            train(peft_model, batch, recipe.plan, label=f"adapter {name}", on_step=step)
            # Embeddings are not trained; "auto" would look the base up on the Hub (offline: slow).
            peft_model.save_pretrained(dest / "adapters" / name, save_embedding_layers=False)

    manifest = {
        "version": DEMO_VERSION,
        "fingerprint": _fingerprint(),
        "adapters": sorted(_ADAPTERS),
    }
    (dest / "demo.json").write_text(json.dumps(manifest, indent=2) + "\n")
