"""ContinuousBatchingEngine: every request of a mixed, continuously changing batch gets exactly
the tokens that plain transformers + PEFT `generate(do_sample=False)` gives it alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine.tiny import (
    TinyFamily,
    collect,
    quiet_peft,
    request,
    run,
    text_of,
    token_ids,
    wait_until,
)
from tuneserve.engine import lora
from tuneserve.engine.continuous import ContinuousBatchingEngine
from tuneserve.engine.cpu_linear import PackedLinear
from tuneserve.engine.types import StreamDelta
from tuneserve.errors import EngineError, UnknownAdapterError
from tuneserve.models.types import AdapterSpec, LoadedModel

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# (device, dtype): float32 and bfloat16 everywhere; float16 on CUDA only (CPU half matmuls are
# slow and not what anyone serves). scripts/gpu-check runs the CUDA ones (`-k cuda`).
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=_NO_CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=_NO_CUDA),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=_NO_CUDA),
]


# -- the oracle ------------------------------------------------------------------------------
_REFERENCES: dict[tuple[str, str | None, str, torch.dtype], Any] = {}


def reference_model(
    family: TinyFamily, adapter: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """transformers (+ PEFT for an adapter) on its own; generation never stops at EOS.

    Loaded here, not through `family.reference()`: that one is shared, and this one is moved
    to a device/dtype and has its generation config changed.
    """
    key = (str(family.base), adapter, device, dtype)
    if key not in _REFERENCES:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        # a transformers model, then a PeftModel around it (and transformers' `.to`, wrapped
        # with functools.wraps(nn.Module.to), reads to mypy as an unbound function)
        model: Any = AutoModelForCausalLM.from_pretrained(family.base, dtype=dtype)
        model = model.to(device).eval()
        if (device, dtype) == ("cpu", torch.bfloat16):
            # the engine holds bfloat16 weights on a CPU and computes in float32 (LoRA too):
            # its oracle is float32 on the weights' bfloat16 values
            model = model.float()
        if adapter is not None:
            with quiet_peft():
                # LoRA in the model's dtype, as the engine computes it (PEFT would upcast)
                path = str(family.adapters[adapter].path)
                model = PeftModel.from_pretrained(model, path, autocast_adapter_dtype=False)
                model = model.eval()
        model.generation_config.eos_token_id = None
        _REFERENCES[key] = model
    return _REFERENCES[key]


def generate_alone(model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    with torch.inference_mode(), quiet_peft():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return list(out[0, len(prompt) :].tolist())


def assert_greedy_matches(
    got: Sequence[int], model: Any, prompt: Sequence[int], *, tolerance: float = 0.0
) -> None:
    """`got` is the reference's greedy output; with a tolerance (half precision), a different
    token is accepted at the first divergence only if the reference scores it within
    `tolerance` of its best (rounding decides near-ties), and nothing after it is compared."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    with torch.inference_mode(), quiet_peft():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=len(got),
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, len(prompt) :].tolist()
    if tolerance == 0.0 or list(got) == expected:
        assert list(got) == expected
        return
    i = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    scores = out.scores[i][0].float()
    gap = float(scores.max() - scores[got[i]])
    assert gap <= tolerance, f"token {i}: {got[i]} scores {gap:.4f} below the best {expected[i]}"


def prompt(length: int, seed: int, vocab: int = 300) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def cpu_kernels_missing() -> bool:
    from tuneserve.engine import cpu_kernels

    return cpu_kernels.load() is None


def engine_for(
    served: LoadedModel,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> ContinuousBatchingEngine:
    if device != "cpu" or dtype != torch.float32:
        served.model.to(device, dtype)
        served.device, served.dtype = device, str(dtype).removeprefix("torch.")
    engine = ContinuousBatchingEngine(served, **kwargs)
    engine.start()
    return engine


# -- mixed batches -----------------------------------------------------------------------------
# (prompt length, adapter): lengths around the prefill chunk (8) and far beyond it
CASES: list[tuple[int, str | None]] = [
    (5, None),
    (17, "alpha"),
    (1, "beta"),
    (30, "gamma"),
    (9, "beta"),
    (12, None),
    (8, "alpha"),
    (23, "gamma"),
]


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("lora_form", ["dense", "grouped", "kernel"])
def test_mixed_batch_with_arrivals_matches_generate_alone(
    tiny: TinyFamily,
    device: str,
    dtype: torch.dtype,
    lora_form: str,
    engines: list[ContinuousBatchingEngine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every form of the batched LoRA (engine/lora.py), whatever the tokens' spread: torch's
    # two, and csrc/lora.c's call where the CPU kernels take the step (float32 on a CPU)
    from tuneserve.engine.cpu_kernels import CpuKernels

    if lora_form == "kernel" and (device != "cpu" or cpu_kernels_missing()):
        pytest.skip("the LoRA kernel runs on a CPU with the CPU kernels")
    if lora_form != "kernel":
        monkeypatch.setattr(CpuKernels, "lora_fits", staticmethod(lambda a: False))
    monkeypatch.setattr(lora, "GROUPED_MIN_SPREAD", 1 if lora_form == "grouped" else 10**6)
    new_tokens = 10
    engine = engine_for(tiny.served(), device, dtype, max_num_seqs=6, prefill_chunk=8, max_loras=3)
    engines.append(engine)
    prompts = [prompt(n, seed=i) for i, (n, _) in enumerate(CASES)]

    async def body() -> list[list[StreamDelta]]:
        def submit(i: int) -> Any:
            params = dict(max_tokens=new_tokens, ignore_eos=True)
            return engine.submit(request(prompts[i], CASES[i][1], request_id=f"r{i}", **params))

        first = [submit(i) for i in range(4)]
        readers = [asyncio.create_task(collect(s)) for s in first]
        await wait_until(lambda: engine.steps >= 3)  # the first ones are mid-flight
        later = [submit(i) for i in range(4, len(CASES))]
        readers += [asyncio.create_task(collect(s)) for s in later]
        return list(await asyncio.gather(*readers))

    results = run(body)
    # float32: token-identical; bfloat16/float16: identical up to a near-tie that rounding decides
    tolerance = 0.0 if dtype == torch.float32 else 0.03
    for (length, adapter), ids, deltas in zip(CASES, prompts, results, strict=True):
        reference = reference_model(tiny, adapter, device, dtype)
        assert_greedy_matches(token_ids(deltas), reference, ids, tolerance=tolerance)
        expected = generate_alone(reference, ids, new_tokens)
        assert deltas[-1].finish_reason == "length"
        assert deltas[-1].completion_tokens == new_tokens
        assert deltas[-1].prompt_tokens == length
        if adapter is not None:  # the check has teeth: each adapter changes the output
            base = generate_alone(reference_model(tiny, None, device, dtype), ids, new_tokens)
            assert expected != base


def test_decode_float16_answers_like_float32_up_to_near_ties(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    """One request at a time: every decode step has one token, so it reads the float16
    copies (a prompt's prefill and larger steps stay float32)."""
    engine = engine_for(tiny_llama.served(), decode_float16=True, max_loras=2)
    engines.append(engine)
    for i, (length, adapter) in enumerate(CASES[:4]):
        ids = prompt(length, seed=i)
        one = request(ids, adapter, request_id=f"r{i}", max_tokens=10)

        async def answer(one: Any = one) -> list[StreamDelta]:
            return await collect(engine.submit(one))

        deltas = run(answer)
        reference = reference_model(tiny_llama, adapter)
        assert_greedy_matches(token_ids(deltas), reference, ids, tolerance=0.03)
    halves = [m.decode_weight for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert halves and all(h is not None and h.dtype == torch.float16 for h in halves)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch-only"])
def test_the_cpu_kernels_serve_decoding_unless_turned_off(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine], kernels: bool
) -> None:
    """Where engine/csrc builds, a float32 CPU engine decodes through it (GEMV, attention,
    RMSNorm/RoPE), answering as transformers + PEFT; cpu_kernels=False leaves torch's alone."""
    from tuneserve.engine import cpu_kernels

    built = cpu_kernels.load()
    if kernels and built is None:
        pytest.skip("the CPU kernels are not available here")
    engine = engine_for(tiny_llama.served(), max_loras=2, cpu_kernels=kernels)
    engines.append(engine)
    for i, (length, adapter) in enumerate(CASES[:3]):
        ids = prompt(length, seed=20 + i)
        one = request(ids, adapter, request_id=f"k{i}", max_tokens=8)

        async def answer(one: Any = one) -> list[StreamDelta]:
            return await collect(engine.submit(one))

        assert_greedy_matches(token_ids(run(answer)), reference_model(tiny_llama, adapter), ids)
    expected = built if kernels else None
    assert engine.kernels is expected
    assert engine._lean is not None and engine._lean.kernels is expected
    plans = [m.plan for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert plans and all((p.gemv if p else None) is expected for p in plans)
    # decode steps of a few tokens as direct kernel calls only where the kernels are
    direct = engine._lean._direct
    assert (direct is not None and direct.steps > 0) if kernels else direct is None


@pytest.mark.parametrize("decode_float16", [False, True], ids=["float32", "float16"])
def test_direct_decode_computes_what_the_modules_compute(
    tiny: TinyFamily, engines: list[ContinuousBatchingEngine], decode_float16: bool
) -> None:
    """Decode steps of up to 4 tokens go through direct_decode.py (its own calls into the same
    kernels): the same tokens and the same logprobs, bit for bit, as the lean forward's
    modules, with requests on two adapters and the base decoding together (Qwen2: biases)."""
    from tuneserve.engine import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip("the CPU kernels are not available here")
    answers = []
    for direct in (True, False):
        engine = engine_for(
            tiny.served(), max_loras=2, direct_decode=direct, decode_float16=decode_float16
        )
        engines.append(engine)
        requests = [
            request(prompt(5 + 3 * i, seed=40 + i), adapter, f"d{i}", max_tokens=10, logprobs=2)
            for i, adapter in enumerate(["alpha", None, "beta"])
        ]

        async def answer(
            engine: ContinuousBatchingEngine = engine, requests: list[Any] = requests
        ) -> list[Any]:
            return await asyncio.gather(*(collect(engine.submit(r)) for r in requests))

        deltas = run(answer)
        answers.append(
            [(token_ids(d), [lp for x in d for lp in (x.logprobs or [])]) for d in deltas]
        )
        assert engine._lean is not None
        direct_path = engine._lean._direct
        if direct:
            assert direct_path is not None and direct_path.steps > 0
        else:
            assert direct_path is None
    assert answers[0] == answers[1]
    assert all(len(tokens) == 10 for tokens, _ in answers[0])


@pytest.mark.parametrize("native", [True, False], ids=["bfloat16-products", "float32-products"])
@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch-only"])
def test_a_bfloat16_model_on_a_cpu_keeps_its_weights_in_bfloat16_and_computes_in_float32(
    tiny_llama: TinyFamily,
    engines: list[ContinuousBatchingEngine],
    native: bool,
    kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """serve --dtype bfloat16 on a CPU: packed bfloat16 weights (products in bfloat16 where the
    CPU has the instructions, else in float32 from the same values), a bfloat16 copy for decode
    steps, a bfloat16 KV cache, float32 everywhere else; the answers are float32's on the same
    weights up to near-ties (inputs, keys and values rounded to bfloat16)."""
    from tuneserve.engine import cpu_kernels, cpu_linear

    if native and not cpu_linear.native_bfloat16():
        pytest.skip("this CPU has no bfloat16 instructions (AVX512_BF16, AMX)")
    if kernels and cpu_kernels.load() is None:
        pytest.skip("the CPU kernels are not available here")
    monkeypatch.setattr(cpu_linear, "native_bfloat16", lambda: native)
    served = tiny_llama.served()
    originals = {
        name: module.weight.detach().to(torch.bfloat16)
        for name, module in served.model.named_modules()
        if name.endswith("down_proj")
    }
    engine = engine_for(served, "cpu", torch.bfloat16, max_loras=2, cpu_kernels=kernels)
    engines.append(engine)
    together = [
        request(prompt(n, seed=60 + i), adapter, f"b{i}", max_tokens=10)
        for i, (n, adapter) in enumerate(CASES[:4])
    ]

    async def answer() -> list[list[StreamDelta]]:
        return await asyncio.gather(*(collect(engine.submit(r)) for r in together))

    for one, deltas in zip(together, run(answer), strict=True):
        reference = reference_model(tiny_llama, one.adapter, "cpu", torch.bfloat16)
        assert_greedy_matches(token_ids(deltas), reference, one.prompt_ids, tolerance=0.03)
    assert next(engine.model.parameters()).dtype == torch.float32
    assert engine.cache.keys[0].dtype == torch.bfloat16 and engine.cache.compute == torch.float32
    packed = {n: m for n, m in engine.model.named_modules() if isinstance(m, PackedLinear)}
    compute = torch.bfloat16 if native else torch.float32
    assert packed and all(m.compute == compute for m in packed.values())
    if kernels:  # decode steps read the weights' bfloat16 values
        for name, weight in originals.items():
            linear = packed.get(name) or packed[f"{name}.base_layer"]  # inside a LoRA wrapper
            assert linear.decode_weight is not None and torch.equal(linear.decode_weight, weight)


def test_decode_float16_is_refused_where_nothing_is_packed(tiny_llama: TinyFamily) -> None:
    served = tiny_llama.served()
    served.model.to(torch.bfloat16)
    with pytest.raises(EngineError, match="--decode-float16 applies to a float32 model on a CPU"):
        ContinuousBatchingEngine(served, decode_float16=True)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch-only"])
def test_a_float32_cpu_step_on_many_adapters_takes_one_kernel_call_a_module(
    tiny_llama: TinyFamily,
    engines: list[ContinuousBatchingEngine],
    kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grouped form (tokens spread over adapters) runs as csrc/lora.c's one call where the
    kernels are, as lora.py's torch ops where not; transformers + PEFT's tokens either way."""
    from tuneserve.engine import cpu_kernels

    if kernels and cpu_kernels.load() is None:
        pytest.skip("the CPU kernels are not available here")
    monkeypatch.setattr(lora, "GROUPED_MIN_SPREAD", 1)  # every mixed step grouped
    calls: list[int] = []
    real = cpu_kernels.CpuKernels.lora_delta

    def counted(self: Any, *args: Any) -> Any:
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(cpu_kernels.CpuKernels, "lora_delta", counted)
    engine = engine_for(tiny_llama.served(), max_loras=3, cpu_kernels=kernels)
    engines.append(engine)
    together = [
        request(prompt(6 + 2 * i, seed=80 + i), adapter, f"g{i}", max_tokens=8)
        for i, adapter in enumerate(["alpha", "beta", "gamma", None])
    ]

    async def answer() -> list[list[StreamDelta]]:
        return await asyncio.gather(*(collect(engine.submit(r)) for r in together))

    for one, deltas in zip(together, run(answer), strict=True):
        reference = reference_model(tiny_llama, one.adapter)
        assert_greedy_matches(token_ids(deltas), reference, one.prompt_ids)
    assert bool(calls) == kernels


def test_more_adapters_than_hot_slots_all_answered_correctly(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(
        tiny_llama.served(), max_num_seqs=8, prefill_chunk=16, max_loras=1, max_cpu_loras=1
    )
    engines.append(engine)
    plan = [
        ("alpha", 6),
        ("beta", 11),
        ("gamma", 4),
        (None, 9),
        ("beta", 3),
        ("alpha", 14),
        ("gamma", 7),
    ]
    prompts = [prompt(n, seed=100 + i) for i, (_, n) in enumerate(plan)]

    async def body() -> list[list[StreamDelta]]:
        streams = [
            engine.submit(request(p, a, request_id=f"l{i}", max_tokens=6, ignore_eos=True))
            for i, ((a, _), p) in enumerate(zip(plan, prompts, strict=True))
        ]
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    for (adapter, _), ids, deltas in zip(plan, prompts, run(body), strict=True):
        assert token_ids(deltas) == generate_alone(reference_model(tiny_llama, adapter), ids, 6)
    assert engine.loras is not None
    assert engine.loras.stats.evictions >= 2  # one hot slot served three adapters


def test_requests_beyond_the_kv_budget_wait_then_finish(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served(), max_num_seqs=2, prefill_chunk=64)
    engines.append(engine)
    most_running = 0
    schedule = engine.scheduler.schedule

    def spy() -> Any:
        nonlocal most_running
        chunks = schedule()
        most_running = max(most_running, len(engine.scheduler.running))
        return chunks

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    prompts = [prompt(7 + i, seed=200 + i) for i in range(6)]

    async def body() -> list[list[StreamDelta]]:
        streams = [
            engine.submit(
                request(
                    p, "beta" if i % 2 else None, request_id=f"k{i}", max_tokens=5, ignore_eos=True
                )
            )
            for i, p in enumerate(prompts)
        ]
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = run(body)
    assert most_running == 2
    for i, (ids, deltas) in enumerate(zip(prompts, results, strict=True)):
        adapter = "beta" if i % 2 else None
        assert token_ids(deltas) == generate_alone(reference_model(tiny_llama, adapter), ids, 5)
    assert engine.cache.num_free == engine.cache.num_blocks


def test_cancel_frees_the_seat_for_a_waiting_request(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served(), max_num_seqs=1, max_loras=1)
    engines.append(engine)
    waiting_prompt = prompt(6, seed=300)

    async def body() -> tuple[StreamDelta, list[StreamDelta]]:
        long = engine.submit(
            request(
                prompt(5, seed=301), "alpha", request_id="long", max_tokens=400, ignore_eos=True
            )
        )
        first = await long.__aiter__().__anext__()
        queued = engine.submit(
            request(waiting_prompt, "beta", request_id="queued", max_tokens=4, ignore_eos=True)
        )
        await asyncio.sleep(0.05)
        assert engine.stats().waiting == 1  # one seat, one hot LoRA slot: both taken
        long.cancel()
        deltas = await collect(queued)
        await wait_until(lambda: engine.stats().running == 0)
        return first, deltas

    first, deltas = run(body)
    assert first.token_ids and first.finish_reason is None
    assert token_ids(deltas) == generate_alone(
        reference_model(tiny_llama, "beta"), waiting_prompt, 4
    )
    assert engine.cache.num_free == engine.cache.num_blocks  # every block back
    assert engine.stats().waiting == 0


def test_long_prompt_is_chunked_and_does_not_stall_running_decodes(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served(), max_num_seqs=4, prefill_chunk=8)
    engines.append(engine)
    log: list[str] = []
    long_prompt = prompt(160, seed=400)  # 20 chunks of 8

    async def read(stream: Any, name: str) -> list[StreamDelta]:
        out = []
        async for delta in stream:
            log.append(name)
            out.append(delta)
        return out

    async def body() -> list[StreamDelta]:
        short = engine.submit(
            request(prompt(4, seed=401), request_id="short", max_tokens=60, ignore_eos=True)
        )
        short_reader = asyncio.create_task(read(short, "short"))
        await wait_until(lambda: "short" in log)
        long = engine.submit(
            request(long_prompt, "beta", request_id="long", max_tokens=3, ignore_eos=True)
        )
        long_deltas = await read(long, "long")
        await short_reader
        return long_deltas

    long_deltas = run(body)
    # the short request kept decoding while the long prompt went through in chunks
    assert log.index("long") >= 15
    assert token_ids(long_deltas) == generate_alone(
        reference_model(tiny_llama, "beta"), long_prompt, 3
    )


def test_stop_string_cuts_the_text(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served())
    engines.append(engine)
    ids = prompt(10, seed=500)

    async def body() -> tuple[str, str, list[StreamDelta]]:
        # sampled with a seed: a random tiny model's greedy text is one token repeated
        params: dict[str, Any] = dict(max_tokens=24, ignore_eos=True, temperature=1.0, seed=7)
        free = await collect(engine.submit(request(ids, "gamma", request_id="free", **params)))
        text = text_of(free)
        middle = len(text) // 2
        stop = next(
            text[i : i + 2] for i in range(middle, len(text) - 1) if "\ufffd" not in text[i : i + 2]
        )
        stopped = await collect(
            engine.submit(request(ids, "gamma", request_id="stop", stop=(stop,), **params))
        )
        return text, stop, stopped

    text, stop, stopped = run(body)
    assert stopped[-1].finish_reason == "stop"
    assert text_of(stopped) == text[: text.index(stop)]


def test_softcapping_models_are_refused_before_the_model_is_touched(
    tiny_llama: TinyFamily,
) -> None:
    served = tiny_llama.served(["alpha"])
    served.model.config.attn_logit_softcapping = 50.0  # what Gemma 2 configs carry
    with pytest.raises(EngineError, match="softcapping.*--engine simple"):
        ContinuousBatchingEngine(served)
    q_proj = served.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q_proj) is torch.nn.Linear
    assert served.model.config._attn_implementation != "tuneserve_packed"


def test_unknown_adapter_is_refused_at_submit(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served(["alpha"]))
    engines.append(engine)

    async def body() -> None:
        with pytest.raises(UnknownAdapterError, match="served adapters: alpha"):
            engine.submit(request([5, 6], "nope"))

    run(body)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served())
    engines.append(engine)
    real_forward = engine._forward
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure")
        return real_forward(*args, **kwargs)

    engine._forward = flaky  # type: ignore[method-assign]
    ids = prompt(6, seed=600)

    async def body() -> list[StreamDelta]:
        with pytest.raises(EngineError, match="injected failure"):
            await collect(engine.submit(request(ids, "alpha", request_id="bad", max_tokens=4)))
        return await collect(
            engine.submit(request(ids, "alpha", request_id="good", max_tokens=4, ignore_eos=True))
        )

    deltas = run(body)
    assert engine.is_running
    assert token_ids(deltas) == generate_alone(reference_model(tiny_llama, "alpha"), ids, 4)
    assert engine.cache.num_free == engine.cache.num_blocks


def test_prompts_too_long_or_out_of_vocabulary_fail_alone(
    tiny_llama: TinyFamily, engines: list[ContinuousBatchingEngine]
) -> None:
    engine = engine_for(tiny_llama.served(), max_model_len=32)
    engines.append(engine)

    async def body() -> list[StreamDelta]:
        with pytest.raises(EngineError, match="max_model_len is 32"):
            await collect(engine.submit(request(prompt(32, seed=1), request_id="long")))
        with pytest.raises(EngineError, match="outside the vocabulary"):
            await collect(engine.submit(request([1, 10**6], request_id="oov")))
        # max_tokens beyond the context: clipped to what fits
        return await collect(
            engine.submit(
                request(prompt(28, seed=2), request_id="fit", max_tokens=50, ignore_eos=True)
            )
        )

    deltas = run(body)
    assert deltas[-1].completion_tokens == 4 and deltas[-1].finish_reason == "length"


def test_shutdown_cancels_pending_requests(tiny_llama: TinyFamily) -> None:
    engine = ContinuousBatchingEngine(tiny_llama.served(), max_num_seqs=1)
    engine.start()

    async def body() -> list[list[StreamDelta]]:
        streams = [
            engine.submit(
                request(prompt(4, seed=i), request_id=f"s{i}", max_tokens=400, ignore_eos=True)
            )
            for i in range(3)
        ]
        await wait_until(lambda: engine.steps >= 2)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = run(body)
    assert not engine.is_running
    assert [deltas[-1].finish_reason for deltas in results] == ["cancelled"] * 3


# -- other architectures and adapter variants ------------------------------------------------
def _save_family(root: Path, config: Any, adapters: dict[str, Any], tokenizer: Any) -> TinyFamily:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_dir = root / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    specs: dict[str, AdapterSpec] = {}
    for seed, (name, lora_config) in enumerate(adapters.items(), start=1):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with quiet_peft():
            get_peft_model(base, lora_config).save_pretrained(root / name)
        specs[name] = AdapterSpec(
            name=name,
            path=root / name,
            rank=lora_config.r,
            alpha=lora_config.lora_alpha,
            target_modules=tuple(sorted(lora_config.target_modules)),
            config=lora_config.to_dict(),
        )
    return TinyFamily(family=root.name, base=base_dir, adapters=specs, tokenizer=tokenizer)


def _check_family(
    family: TinyFamily, plan: list[tuple[str | None, int]], new_tokens: int = 8, **kwargs: Any
) -> None:
    engine = ContinuousBatchingEngine(family.served(), **kwargs)
    engine.start()
    prompts = [prompt(n, seed=700 + i) for i, (_, n) in enumerate(plan)]
    try:

        async def body() -> list[list[StreamDelta]]:
            streams = [
                engine.submit(
                    request(p, a, request_id=f"f{i}", max_tokens=new_tokens, ignore_eos=True)
                )
                for i, ((a, _), p) in enumerate(zip(plan, prompts, strict=True))
            ]
            return list(await asyncio.gather(*(collect(s) for s in streams)))

        results = run(body)
    finally:
        engine.shutdown()
    for (adapter, _), ids, deltas in zip(plan, prompts, results, strict=True):
        expected = generate_alone(reference_model(family, adapter), ids, new_tokens)
        assert token_ids(deltas) == expected, f"adapter {adapter}, prompt of {len(ids)}"


def test_sliding_window_is_honoured(tmp_path: Path, tokenizer: Any) -> None:
    from peft import LoraConfig
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=5,
        tie_word_embeddings=False,
    )
    adapters = {
        "sw": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
    }
    family = _save_family(tmp_path / "mistral", config, adapters, tokenizer)
    # prompts longer than the window, chunks smaller than it
    _check_family(family, [("sw", 13), (None, 9), ("sw", 3)], new_tokens=10, prefill_chunk=4)


def test_phi3_fused_qkv_and_gate_up(tmp_path: Path, tokenizer: Any) -> None:
    from peft import LoraConfig
    from transformers import Phi3Config

    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    adapters = {
        "fused": LoraConfig(
            r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights=False
        ),
        "out": LoraConfig(
            r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False
        ),
    }
    family = _save_family(tmp_path / "phi3", config, adapters, tokenizer)
    _check_family(family, [("fused", 7), ("out", 12), (None, 5), ("fused", 2)], prefill_chunk=8)


def test_rank_and_alpha_patterns_and_rslora(
    tmp_path: Path, tokenizer: Any, tiny_llama: TinyFamily
) -> None:
    from peft import LoraConfig

    config = tiny_llama.load_base().config
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    adapters = {
        "patterns": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            rank_pattern={"k_proj": 2, "layers.1.self_attn.o_proj": 6},
            alpha_pattern={"v_proj": 32, "down_proj": 3},
            init_lora_weights=False,
        ),
        "rslora": LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, use_rslora=True, init_lora_weights=False
        ),
    }
    family = _save_family(tmp_path / "patterns", config, adapters, tokenizer)
    _check_family(
        family, [("patterns", 6), ("rslora", 10), ("patterns", 15), (None, 4)], prefill_chunk=8
    )


# -- the packed attention against a per-token loop -------------------------------------------
class _Layer(torch.nn.Module):
    layer_idx = 0


def _attention_oracle(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int, window: int | None
) -> torch.Tensor:
    """One query token [H, D] over its row's keys/values [KVH, >pos, D]: causal, windowed."""
    lo = max(0, pos - window + 1) if window else 0
    groups = q.shape[0] // keys.shape[0]
    k = keys[:, lo : pos + 1].repeat_interleave(groups, 0)  # [H, L, D]
    v = values[:, lo : pos + 1].repeat_interleave(groups, 0)
    weights = ((k @ q[:, :, None])[..., 0] * q.shape[-1] ** -0.5).softmax(-1)  # [H, L]
    return (weights[:, None, :] @ v)[:, 0]  # [H, D]


@pytest.mark.parametrize("window", [None, 3], ids=["full", "sliding-3"])
@pytest.mark.parametrize("decode", ["torch", "kernel"])
def test_packed_attention_equals_a_per_token_loop(window: int | None, decode: str) -> None:
    """Decode rows through torch's SDPA, or through our CPU kernel (cpu_kernels.py)."""
    from tuneserve.engine import cpu_kernels
    from tuneserve.engine.attention import PackedStep, RowChunk, packed_attention
    from tuneserve.engine.kv_cache import KVCache, KVCacheShape

    kernels = cpu_kernels.load() if decode == "kernel" else None
    if decode == "kernel" and kernels is None:
        pytest.skip("the CPU kernels are not available here")

    heads, kv_heads, dim = 4, 2, 8
    shape = KVCacheShape(
        num_layers=1, num_kv_heads=kv_heads, head_dim=dim, num_blocks=10, block_size=4
    )
    cache = KVCache(shape, dtype=torch.float32, device="cpu")
    # block tables out of order and interleaved: rows are found through them, not by layout
    tables = {0: [5, 1], 1: [2, 7], 2: [3, 6], 3: [4], 4: [8, 9]}
    history = {
        s: (torch.zeros(kv_heads, 16, dim), torch.zeros(kv_heads, 16, dim)) for s in range(5)
    }
    torch.manual_seed(0)
    steps = [
        # a one-token prompt (a decode-shaped row, first), then prefills
        [(3, 0, 1), (0, 0, 5), (1, 0, 2), (2, 0, 3)],
        # decodes of different lengths, then a later chunk of a prompt (gathered prefix)
        [(0, 5, 1), (1, 2, 1), (3, 1, 1), (2, 3, 4)],
        # every sequence decoding; sequence 2 crosses into its second block
        [(0, 6, 1), (1, 3, 1), (2, 7, 1), (3, 2, 1)],
        # one sequence alone: consecutive blocks are read in place, others gathered
        [(4, 0, 5)],
        [(4, 5, 1)],
        [(0, 7, 1)],
    ]
    for plan in steps:
        rows = [RowChunk(tables[seq], start, n) for seq, start, n in plan]
        n = sum(r.num_tokens for r in rows)
        q, k, v = (
            torch.randn(1, heads, n, dim),
            torch.randn(1, kv_heads, n, dim),
            torch.randn(1, kv_heads, n, dim),
        )
        step = PackedStep.build(cache, rows, "cpu", kernels)
        assert (step.kernels is not None) == (kernels is not None and rows[0].num_tokens == 1)
        out, _ = packed_attention(
            _Layer(), q, k, v, None, scaling=dim**-0.5, sliding_window=window, tuneserve_step=step
        )  # [1, N, H, D]
        i = 0
        for (seq, _, _), row in zip(plan, rows, strict=True):
            hk, hv = history[seq]
            for t in range(row.num_tokens):
                hk[:, row.start + t], hv[:, row.start + t] = k[0, :, i + t], v[0, :, i + t]
            for t in range(row.num_tokens):
                expected = _attention_oracle(q[0, :, i + t], hk, hv, row.start + t, window)
                torch.testing.assert_close(out[0, i + t], expected, rtol=1e-5, atol=1e-5)
            i += row.num_tokens
