"""The lean forward (engine/lean_forward.py) computes what HF's modeling code computes.

The engine's end-to-end tests (test_continuous.py) already compare its greedy tokens with
transformers + PEFT on Llama, Qwen2 and Mistral, which run through the lean forward; here its
logits are compared with HF's forward on the same model, step and cache, over a step that
mixes decode rows, a first prefill chunk and a later one, with adapters on some tokens, packed
and unpacked Linears.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.engine.tiny import TinyFamily, tiny_config
from tuneserve.engine.attention import STEP_KWARG, PackedStep, RowChunk
from tuneserve.engine.continuous import ContinuousBatchingEngine
from tuneserve.engine.cpu_linear import pack_linears
from tuneserve.engine.lean_forward import LeanForward


def _mixed_step(engine: ContinuousBatchingEngine) -> tuple[torch.Tensor, PackedStep, torch.Tensor]:
    """Two decode rows (positions 5 and 20), a first prefill chunk of 7 tokens and a later
    chunk of 6 at position 8; adapters on the second decode and the first chunk."""
    cache = engine.cache
    slots = [engine.loras.acquire(name) for name in ("alpha", "beta")]
    assert None not in slots
    alpha, beta = (int(s) for s in slots)  # type: ignore[arg-type]
    rows = [
        RowChunk(cache.allocate(1) or [], 5, 1),
        RowChunk(cache.allocate(2) or [], 20, 1),
        RowChunk(cache.allocate(1) or [], 0, 7),
        RowChunk(cache.allocate(1) or [], 8, 6),
    ]
    row_slots = [-1, alpha, beta, -1]
    token_slots = [s for row, s in zip(rows, row_slots, strict=True) for _ in range(row.num_tokens)]
    ends = torch.tensor([row.num_tokens for row in rows]).cumsum(0) - 1
    engine.loras.batch.set(token_slots, row_slots, engine.device)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (len(token_slots),), generator=gen)
    return ids, PackedStep.build(cache, rows, engine.device, engine.kernels), ends


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu-kernels"])
def test_lean_logits_equal_hf_forward(tiny: TinyFamily, packed: bool, kernels: bool) -> None:
    """With the CPU kernels: RMSNorm, RoPE and the decode rows' attention through them."""
    engine = ContinuousBatchingEngine(tiny.served(), max_num_seqs=4)  # not started
    lean = engine._lean
    assert lean is not None, f"{tiny.family} should run the lean forward"
    if kernels and lean.kernels is None:
        pytest.skip("the CPU kernels are not available here")
    if not kernels:
        lean.kernels = engine.kernels = None
    with torch.inference_mode():
        if packed:
            pack_linears(engine.model, kernels=engine.kernels)
        ids, step, keep = _mixed_step(engine)
        # both write the same keys/values into the same cache rows: the order does not matter
        got = lean(ids, step, keep)
        want = engine.model(
            input_ids=ids[None],
            position_ids=step.positions[None],
            use_cache=False,
            logits_to_keep=keep,
            **{STEP_KWARG: step},
        ).logits[0]
    assert got.shape == want.shape == (4, engine.vocab_size)
    # the same ops in the same order; SDPA may see other strides, hence not bit-exact by rule
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_other_architectures_keep_hf_forward(tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM, Phi3Config
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    llama_config = tiny_config("llama", tokenizer)
    # the same sizes in Phi-3's layout: fused qkv_proj / gate_up_proj, HF's forward
    phi3 = AutoModelForCausalLM.from_config(Phi3Config(**llama_config.to_diff_dict()))
    assert type(phi3).__name__ == "Phi3ForCausalLM" and LeanForward.of(phi3) is None

    class Patched(LlamaForCausalLM):  # a subclass may compute anything: not recognised
        pass

    assert LeanForward.of(Patched(llama_config)) is None
    assert LeanForward.of(LlamaForCausalLM(llama_config)) is not None


def test_the_engine_can_keep_hf_forward(tiny_llama: TinyFamily) -> None:
    assert ContinuousBatchingEngine(tiny_llama.served())._lean is not None
    assert ContinuousBatchingEngine(tiny_llama.served(), lean_forward=False)._lean is None
