"""Adapters loaded, replaced and unloaded while an engine serves, on both engines.

The oracle is plain transformers + PEFT `generate(do_sample=False)` of one request alone, with
the adapter read from the same folder the engine was given.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.test_continuous import generate_alone, prompt
from tests.engine.tiny import TinyFamily, collect, quiet_peft, request, run, tiny_config, token_ids
from tuneserve.engine.continuous import ContinuousBatchingEngine
from tuneserve.engine.lora import BatchedLoRALinear
from tuneserve.engine.simple import PeftBatchEngine
from tuneserve.engine.threaded import ThreadedEngine
from tuneserve.engine.types import AdapterUsage, StreamDelta
from tuneserve.errors import AdapterError, EngineError, UnknownAdapterError
from tuneserve.models.adapters import validate_adapter
from tuneserve.models.types import AdapterSpec, LoadedModel

ENGINES = ["continuous", "simple"]


# -- adapters made for these tests -------------------------------------------------------------
@dataclass(frozen=True)
class Folders:
    delta: Path  # o_proj + up_proj: modules the startup adapter "alpha" (q, v) leaves alone
    swap_v1: Path  # two versions of one adapter (q, v), different weights
    swap_v2: Path
    wrong_shape: Path  # for a model with another hidden size
    extra_layer: Path  # for a model with a third layer


def _save(base_model: Any, path: Path, seed: int, targets: list[str], r: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with quiet_peft():
        get_peft_model(base_model, config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def folders(tiny_llama: TinyFamily, tmp_path_factory: pytest.TempPathFactory) -> Folders:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("runtime-adapters")
    qv = ["q_proj", "v_proj"]
    narrow = tiny_config("llama", tiny_llama.tokenizer)
    narrow.hidden_size, narrow.intermediate_size = 32, 64
    deep = tiny_config("llama", tiny_llama.tokenizer)
    deep.num_hidden_layers = 3
    return Folders(
        delta=_save(tiny_llama.load_base(), root / "delta", 11, ["o_proj", "up_proj"]),
        swap_v1=_save(tiny_llama.load_base(), root / "swap-v1", 12, qv),
        swap_v2=_save(tiny_llama.load_base(), root / "swap-v2", 13, qv, r=8),
        wrong_shape=_save(AutoModelForCausalLM.from_config(narrow), root / "narrow", 14, qv),
        extra_layer=_save(AutoModelForCausalLM.from_config(deep), root / "deep", 15, qv),
    )


def spec_for(name: str, path: Path, model: Any) -> AdapterSpec:
    """What the server hands the engine: a spec validated against the served model."""
    return validate_adapter(name, path, model)


def unchecked_spec(name: str, path: Path) -> AdapterSpec:
    """A spec that never met validate_adapter: the engine must refuse it on its own."""
    import json

    config = json.loads((path / "adapter_config.json").read_text())
    return AdapterSpec(
        name=name,
        path=path,
        rank=config["r"],
        alpha=config["lora_alpha"],
        target_modules=tuple(config["target_modules"]),
        config=config,
    )


# -- the oracle ----------------------------------------------------------------------------------
_ORACLES: dict[tuple[str, str | None], Any] = {}


def expected(family: TinyFamily, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    key = (str(family.base), None if adapter is None else str(adapter))
    if key not in _ORACLES:
        from peft import PeftModel

        model = family.load_base()
        if adapter is not None:
            with quiet_peft():
                model = PeftModel.from_pretrained(
                    model, str(adapter), autocast_adapter_dtype=False
                ).eval()
        model.generation_config.eos_token_id = None
        _ORACLES[key] = model
    return generate_alone(_ORACLES[key], ids, n)


# -- engines -------------------------------------------------------------------------------------
@pytest.fixture
def engines() -> Iterator[list[ThreadedEngine]]:
    built: list[ThreadedEngine] = []
    yield built
    for engine in built:
        engine.shutdown()


def build(
    kind: str,
    served: LoadedModel,
    engines: list[ThreadedEngine],
    *,
    max_num_seqs: int = 8,
    start: bool = True,
    **kwargs: Any,
) -> ThreadedEngine:
    engine: ThreadedEngine
    if kind == "continuous":
        engine = ContinuousBatchingEngine(
            served, max_num_seqs=max_num_seqs, prefill_chunk=16, **kwargs
        )
    else:
        engine = PeftBatchEngine(served, max_batch_size=max_num_seqs)
    engines.append(engine)
    if start:
        engine.start()
    return engine


def slow_down(served: LoadedModel, seconds: float = 0.003) -> None:
    """Every forward takes at least `seconds`: a long request surely spans an adapter change."""
    served.model.get_input_embeddings().register_forward_pre_hook(lambda *_: time.sleep(seconds))


def greedy(ids: list[int], adapter: str | None, request_id: str, n: int) -> Any:
    return request(ids, adapter, request_id=request_id, max_tokens=n, ignore_eos=True)


async def gather(engine: ThreadedEngine, *requests: Any) -> list[list[StreamDelta]]:
    return list(await asyncio.gather(*(collect(engine.submit(r)) for r in requests)))


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ENGINES)
def test_adapter_added_to_an_engine_started_without_any_is_exact(
    kind: str, tiny_llama: TinyFamily, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served([])
    slow_down(served)
    engine = build(kind, served, engines)
    assert engine.adapter_names == []
    beta = tiny_llama.adapters["beta"]
    ids = [prompt(9, seed=1), prompt(4, seed=2), prompt(13, seed=3), prompt(5, seed=4)]
    n = 40

    async def body() -> tuple[list[StreamDelta], int, list[list[StreamDelta]]]:
        received: list[StreamDelta] = []

        async def read_base() -> None:  # a base-model request running across the add
            async for delta in engine.submit(greedy(ids[3], None, "base", n)):
                received.append(delta)

        reader = asyncio.create_task(read_base())
        while not received:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(engine.add_adapter, spec_for("beta", beta.path, served.model))
        seen_at_add = len(received)
        assert engine.adapter_names == ["beta"]
        results = await gather(
            engine,
            greedy(ids[0], "beta", "a", 6),
            greedy(ids[1], None, "b", 6),
            greedy(ids[2], "beta", "c", 6),
        )
        await reader
        return received, seen_at_add, results

    running, seen_at_add, results = run(body)
    got = [token_ids(d) for d in results]
    assert got[0] == expected(tiny_llama, beta.path, ids[0], 6)
    assert got[1] == expected(tiny_llama, None, ids[1], 6)
    assert got[2] == expected(tiny_llama, beta.path, ids[2], 6)
    assert got[0] != expected(tiny_llama, None, ids[0], 6)  # the adapter changes the output
    assert seen_at_add < n, "the add should land while the base request runs"
    assert token_ids(running) == expected(tiny_llama, None, ids[3], n)


@pytest.mark.parametrize("kind", ENGINES)
def test_adapter_on_modules_no_startup_adapter_targets_is_exact(
    kind: str, tiny_llama: TinyFamily, folders: Folders, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha"])  # q_proj, v_proj
    engine = build(kind, served, engines)
    alpha = tiny_llama.adapters["alpha"].path
    ids = [prompt(7, seed=10), prompt(11, seed=11), prompt(5, seed=12)]

    async def body() -> list[list[StreamDelta]]:
        spec = spec_for("delta", folders.delta, served.model)
        await asyncio.to_thread(engine.add_adapter, spec)
        return await gather(
            engine,
            greedy(ids[0], "delta", "d", 6),
            greedy(ids[1], "alpha", "a", 6),
            greedy(ids[2], None, "n", 6),
        )

    got = [token_ids(d) for d in run(body)]
    assert got[0] == expected(tiny_llama, folders.delta, ids[0], 6)
    assert got[0] != expected(tiny_llama, None, ids[0], 6)
    assert got[1] == expected(tiny_llama, alpha, ids[1], 6)
    assert got[2] == expected(tiny_llama, None, ids[2], 6)
    if isinstance(engine, ContinuousBatchingEngine):
        o_proj = served.model.get_submodule("model.layers.1.self_attn.o_proj")
        assert isinstance(o_proj, BatchedLoRALinear)  # wrapped when "delta" arrived


@pytest.mark.parametrize("kind", ENGINES)
def test_a_bin_adapter_that_validates_is_served_exactly(
    kind: str,
    tiny_llama: TinyFamily,
    folders: Folders,
    engines: list[ThreadedEngine],
    tmp_path: Path,
) -> None:
    """One file policy: an adapter_model.bin that passes validation is one each engine reads."""
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folders.delta / "adapter_config.json", legacy)
    tensors = load_file(str(folders.delta / "adapter_model.safetensors"))
    torch.save(tensors, legacy / "adapter_model.bin")
    served = tiny_llama.served([])
    engine = build(kind, served, engines)
    ids = prompt(7, seed=20)

    async def body() -> list[list[StreamDelta]]:
        await asyncio.to_thread(engine.add_adapter, spec_for("legacy", legacy, served.model))
        return await gather(engine, greedy(ids, "legacy", "l", 6))

    (deltas,) = run(body)
    assert token_ids(deltas) == expected(tiny_llama, folders.delta, ids, 6)


@pytest.mark.parametrize("kind", ENGINES)
def test_replace_keeps_running_requests_on_the_old_version(
    kind: str, tiny_llama: TinyFamily, folders: Folders, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served([])
    slow_down(served)
    engine = build(kind, served, engines)
    long_ids, new_ids, n = prompt(6, seed=20), prompt(8, seed=21), 60

    async def body() -> tuple[list[StreamDelta], int, list[StreamDelta]]:
        engine.add_adapter(spec_for("swap", folders.swap_v1, served.model))  # no forward runs
        received: list[StreamDelta] = []

        async def read_long() -> None:
            async for delta in engine.submit(greedy(long_ids, "swap", "long", n)):
                received.append(delta)

        reader = asyncio.create_task(read_long())
        while not received:
            await asyncio.sleep(0.005)
        v2 = spec_for("swap", folders.swap_v2, served.model)
        await asyncio.to_thread(engine.add_adapter, v2)
        seen_at_replace = len(received)
        after = await collect(engine.submit(greedy(new_ids, "swap", "new", 6)))
        await reader
        return received, seen_at_replace, after

    long, seen_at_replace, after = run(body)
    assert seen_at_replace < n, "the replace should land while the long request runs"
    assert long[-1].finish_reason == "length"
    assert token_ids(long) == expected(tiny_llama, folders.swap_v1, long_ids, n)
    assert token_ids(after) == expected(tiny_llama, folders.swap_v2, new_ids, 6)
    assert token_ids(after) != expected(tiny_llama, folders.swap_v1, new_ids, 6)
    assert engine.adapters["swap"].path == folders.swap_v2
    # the old version is gone once its last request ended
    if isinstance(engine, ContinuousBatchingEngine):
        q_proj = engine.loras.layers["model.layers.0.self_attn.q_proj"]
        assert sorted(r for r in q_proj.ranks if r) == [8]  # only v2 (rank 8) is left
    else:
        assert isinstance(engine, PeftBatchEngine)
        assert len(engine.model.peft_config) == 1


@pytest.mark.parametrize("kind", ENGINES)
def test_replace_and_remove_idle_adapters_next_to_others(
    kind: str, tiny_llama: TinyFamily, folders: Folders, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha", "gamma"])
    engine = build(kind, served, engines)
    gamma = tiny_llama.adapters["gamma"].path
    ids = [prompt(6, seed=80), prompt(9, seed=81)]

    async def body() -> list[list[StreamDelta]]:
        await gather(engine, greedy(ids[0], "alpha", "a", 2), greedy(ids[1], "gamma", "g", 2))
        # both hot and idle: the old alpha is dropped at once, next to a hot gamma
        spec = spec_for("alpha", folders.swap_v1, served.model)
        await asyncio.to_thread(engine.add_adapter, spec)
        return await gather(
            engine, greedy(ids[0], "alpha", "a2", 5), greedy(ids[1], "gamma", "g2", 5)
        )

    alpha, gamma_out = (token_ids(d) for d in run(body))
    assert alpha == expected(tiny_llama, folders.swap_v1, ids[0], 5)
    assert gamma_out == expected(tiny_llama, gamma, ids[1], 5)
    engine.remove_adapter("gamma")
    assert engine.adapter_names == ["alpha"]
    if isinstance(engine, ContinuousBatchingEngine):
        assert sorted(engine.loras.hot.values()) == ["alpha"]
        down = engine.loras.layers["model.layers.0.mlp.down_proj"]  # only gamma targets it
        assert not any(down.ranks)
    else:
        assert isinstance(engine, PeftBatchEngine)
        assert len(engine.model.peft_config) == 1


@pytest.mark.parametrize("kind", ENGINES)
def test_remove_running_finish_waiting_fail_later_refused(
    kind: str, tiny_llama: TinyFamily, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha"])
    slow_down(served)
    engine = build(kind, served, engines, max_num_seqs=1)
    alpha = tiny_llama.adapters["alpha"].path
    long_ids, n = prompt(5, seed=30), 40

    async def body() -> tuple[list[StreamDelta], EngineError]:
        received: list[StreamDelta] = []

        async def read_long() -> None:
            async for delta in engine.submit(greedy(long_ids, "alpha", "long", n)):
                received.append(delta)

        reader = asyncio.create_task(read_long())
        while not received:
            await asyncio.sleep(0.005)
        waiting = engine.submit(greedy(prompt(4, seed=31), "alpha", "waiting", 4))
        await asyncio.sleep(0.02)
        assert engine.stats().waiting == 1  # one seat, taken by the long request
        await asyncio.to_thread(engine.remove_adapter, "alpha")
        assert len(received) < n, "the remove should land while the long request runs"
        with pytest.raises(UnknownAdapterError, match="'alpha'"):
            engine.submit(greedy(long_ids, "alpha", "late", 4))
        with pytest.raises(EngineError) as failed:
            await collect(waiting)
        await reader
        return received, failed.value

    long, failure = run(body)
    assert "adapter 'alpha' was unloaded" in str(failure) and "waiting" in str(failure)
    assert long[-1].finish_reason == "length"
    assert token_ids(long) == expected(tiny_llama, alpha, long_ids, n)
    assert engine.adapter_names == [] and engine.adapter_usage() == {}
    with pytest.raises(UnknownAdapterError):
        engine.remove_adapter("alpha")
    if isinstance(engine, ContinuousBatchingEngine):
        assert engine.loras.hot == {}
        q_proj = engine.loras.layers["model.layers.0.self_attn.q_proj"]
        assert not any(q_proj.ranks)  # its slot was freed when the long request ended
    else:
        from peft import PeftModel

        assert isinstance(engine, PeftBatchEngine)
        assert not isinstance(engine.model, PeftModel)  # no adapter left: the bare model again


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param(
            "wrong_shape", r"do not fit the base layer 64->64|has shape \[4, 32\]", id="shapes"
        ),
        pytest.param(
            "extra_layer", r"'model\.layers\.2\.self_attn\.q_proj'.* does not exist", id="module"
        ),
    ],
)
def test_a_bad_adapter_is_refused_and_the_old_version_keeps_serving(
    kind: str,
    bad: str,
    message: str,
    tiny_llama: TinyFamily,
    folders: Folders,
    engines: list[ThreadedEngine],
) -> None:
    served = tiny_llama.served(["alpha"])
    engine = build(kind, served, engines)
    alpha = tiny_llama.adapters["alpha"]
    ids = prompt(9, seed=40)

    async def body() -> list[StreamDelta]:
        spec = unchecked_spec("alpha", getattr(folders, bad))
        with pytest.raises(AdapterError, match=f"adapter .alpha.: .*({message})"):
            await asyncio.to_thread(engine.add_adapter, spec)
        return await collect(engine.submit(greedy(ids, "alpha", "after", 6)))

    assert token_ids(run(body)) == expected(tiny_llama, alpha.path, ids, 6)
    assert engine.adapters == {"alpha": alpha}


def test_more_runtime_adapters_than_hot_slots_are_all_exact(
    tiny_llama: TinyFamily, folders: Folders, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served([])
    engine = build("continuous", served, engines, max_loras=1, max_cpu_loras=1)
    paths = {"alpha": tiny_llama.adapters["alpha"].path, "delta": folders.delta}
    paths["gamma"] = tiny_llama.adapters["gamma"].path
    plan = [("alpha", 6), ("delta", 9), ("gamma", 4), (None, 5), ("delta", 3), ("alpha", 8)]
    ids = [prompt(length, seed=50 + i) for i, (_, length) in enumerate(plan)]

    async def body() -> list[list[StreamDelta]]:
        for name, path in paths.items():
            await asyncio.to_thread(engine.add_adapter, spec_for(name, path, served.model))
        return await gather(
            engine,
            *(
                greedy(p, a, f"l{i}", 5)
                for i, ((a, _), p) in enumerate(zip(plan, ids, strict=True))
            ),
        )

    for (adapter, _), p, deltas in zip(plan, ids, run(body), strict=True):
        path = None if adapter is None else paths[adapter]
        assert token_ids(deltas) == expected(tiny_llama, path, p, 5), adapter
    assert isinstance(engine, ContinuousBatchingEngine)
    assert engine.loras.stats.evictions >= 2  # one slot served three adapters
    assert engine.loras.stats.disk_reads >= 1  # and one CPU copy: runtime ones read again


def test_usage_reports_where_each_adapter_is_and_when_it_was_used(
    tiny_llama: TinyFamily, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha"])
    engine = build("continuous", served, engines, max_loras=1, max_cpu_loras=2)
    beta = tiny_llama.adapters["beta"]
    assert engine.adapter_usage() == {"alpha": AdapterUsage("disk", None)}

    async def body() -> list[dict[str, AdapterUsage]]:
        await asyncio.to_thread(engine.add_adapter, spec_for("beta", beta.path, served.model))
        seen = [engine.adapter_usage()]
        await collect(engine.submit(greedy(prompt(4, seed=60), "alpha", "a", 2)))
        seen.append(engine.adapter_usage())
        await collect(engine.submit(greedy(prompt(4, seed=61), "beta", "b", 2)))
        seen.append(engine.adapter_usage())
        return seen

    before = time.time()
    added, after_alpha, after_beta = run(body)
    assert added == {"alpha": AdapterUsage("disk", None), "beta": AdapterUsage("cpu", None)}
    assert after_alpha["alpha"].state == "hot" and after_alpha["beta"].state == "cpu"
    alpha_used = after_alpha["alpha"].last_used
    assert alpha_used is not None and before <= alpha_used <= time.time()
    assert after_beta["beta"].state == "hot"
    assert after_beta["alpha"] == AdapterUsage("cpu", alpha_used)  # evicted from the one slot
    beta_used = after_beta["beta"].last_used
    assert beta_used is not None and beta_used >= alpha_used


def test_simple_engine_usage_is_hot_with_last_use(
    tiny_llama: TinyFamily, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha", "gamma"])
    engine = build("simple", served, engines)
    assert engine.adapter_usage() == {
        "alpha": AdapterUsage("hot", None),
        "gamma": AdapterUsage("hot", None),
    }
    before = time.time()
    run(lambda: collect(engine.submit(greedy(prompt(4, seed=62), "gamma", "g", 2))))
    usage = engine.adapter_usage()
    assert usage["alpha"] == AdapterUsage("hot", None)
    last = usage["gamma"].last_used
    assert usage["gamma"].state == "hot" and last is not None and before <= last <= time.time()


@pytest.mark.parametrize("kind", ENGINES)
def test_adapters_change_before_start_and_not_after_shutdown(
    kind: str, tiny_llama: TinyFamily, folders: Folders, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha"])
    engine = build(kind, served, engines, start=False)
    engine.add_adapter(spec_for("delta", folders.delta, served.model))  # runs in place
    engine.remove_adapter("alpha")
    assert engine.adapter_names == ["delta"]
    engine.start()
    ids = prompt(6, seed=70)
    deltas = run(lambda: collect(engine.submit(greedy(ids, "delta", "d", 5))))
    assert token_ids(deltas) == expected(tiny_llama, folders.delta, ids, 5)
    engine.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        engine.add_adapter(spec_for("again", folders.delta, served.model))
    with pytest.raises(EngineError, match="shut down"):
        engine.remove_adapter("delta")


@pytest.mark.parametrize("kind", ENGINES)
def test_validate_adapter_sees_through_the_engine_s_wrapped_layers(
    kind: str, tiny_llama: TinyFamily, folders: Folders, engines: list[ThreadedEngine]
) -> None:
    served = tiny_llama.served(["alpha"])  # wraps q_proj and v_proj
    engine = build(kind, served, engines, start=False)
    q_proj = served.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q_proj) is not torch.nn.Linear
    assert isinstance(q_proj.get_base_layer(), torch.nn.Linear)  # packed on CPU: a subclass
    # beta targets wrapped and unwrapped modules, delta only unwrapped ones
    beta = validate_adapter("beta", tiny_llama.adapters["beta"].path, served.model)
    assert set(beta.target_modules) >= {"q_proj", "down_proj"}
    engine.add_adapter(spec_for("delta", folders.delta, served.model))
    assert validate_adapter("delta2", folders.delta, served.model).rank == 4
    # and still refuses what does not fit
    with pytest.raises(AdapterError, match="shape"):
        validate_adapter("narrow", folders.wrong_shape, served.model)
    with pytest.raises(AdapterError, match="model.layers.2"):
        validate_adapter("deep", folders.extra_layer, served.model)
