"""The fast engine: continuous batching over our own KV cache, every row with its own LoRA.

Token ids in, text deltas out (engine/types.py); it knows nothing of HTTP. The model's own
modules compute (through HF's modeling code, or for Llama-family decoders through
lean_forward.py); the engine owns what is around them:

- kv_cache.py  a pool of KV blocks, the memory budget; sequences take blocks as they grow;
- attention.py a registered attention function: one packed forward `[1, N]` carries prefill
               chunks and decode tokens of every row, masking is per row;
- lean_forward.py Llama-family decoders run directly, without HF's per-layer framework;
- cpu_linear.py on CPU in float32, Linears packed for oneDNN and sibling projections fused;
- lora.py      targeted Linears become batched multi-LoRA layers over hot adapter slots;
- scheduler.py who runs each step: decodes always, prompts in chunks under a token budget,
               arrivals joining and finished rows leaving at every step.

Each step on the engine thread:

1. take new requests and cancellations from the event loop side;
2. schedule: the chunks of this step;
3. one forward with `logits_to_keep` = the last token of each row that completes;
4. sample those rows (sampling.py); output.py turns each token into a delta (text, stop
   strings, the finish decision) for the request's stream (stream.py); finished rows give
   back their slots at once.

An error in a step fails the requests of that step; the loop keeps serving the others.

Adapters change between steps (`add_adapter`, `remove_adapter`): the weights file is read on
the caller's thread, the slots change on the engine thread (lora.py `install`/`remove`). A
waiting request holds its adapter's name and gets whatever version is served when it is
admitted; a running one keeps the version it started with.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from tuneserve.engine import cpu_kernels as kernels_lib
from tuneserve.engine import openmp
from tuneserve.engine.attention import (
    STEP_KWARG,
    PackedStep,
    RowChunk,
    check_supported,
    install_packed_attention,
)
from tuneserve.engine.cpu_linear import can_pack, pack_linears
from tuneserve.engine.kv_cache import (
    GPU_MEMORY_UTILIZATION,
    KVCache,
    KVCacheShape,
    format_bytes,
    kv_cache_budget,
)
from tuneserve.engine.lean_forward import LeanForward
from tuneserve.engine.lora import LoRAManager, load_adapter_weights, read_layout
from tuneserve.engine.output import RequestOutput, eos_token_ids, invalid_prompt
from tuneserve.engine.sampling import sample
from tuneserve.engine.scheduler import ScheduledChunk, Scheduler, Sequence
from tuneserve.engine.stream import QueueRequestStream
from tuneserve.engine.structured import GrammarCompiler
from tuneserve.engine.threaded import ThreadedEngine
from tuneserve.engine.types import (
    AdapterUsage,
    EngineStats,
    FinishReason,
    GenerationRequest,
    StreamDelta,
    distinct_adapters,
)
from tuneserve.errors import AdapterError, EngineError
from tuneserve.models.types import AdapterSpec, LoadedModel

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens per step: long prompts wait in chunks, decodes keep going


@dataclass(eq=False)
class _Row:
    """The engine's state of one request next to its scheduler Sequence."""

    seq: Sequence
    stream: QueueRequestStream
    output: RequestOutput

    def push_finish(self, reason: FinishReason) -> None:
        self.stream.push(self.output.finish(reason))


class ContinuousBatchingEngine(ThreadedEngine):
    """Continuous batching with mixed-adapter batches (see the module docstring)."""

    def __init__(
        self,
        served: LoadedModel,
        *,
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        max_loras: int = 8,
        max_cpu_loras: int | None = None,
        prefill_chunk: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float | None = None,
        decode_float16: bool | None = None,
        lean_forward: bool = True,
        cpu_kernels: bool = True,
        direct_decode: bool = True,
    ) -> None:
        prefill_chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        super().__init__(served)
        self.model = served.model.eval()
        self.max_model_len = int(max_model_len or served.max_model_len)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        self.max_num_seqs = max_num_seqs
        parameter = next(self.model.parameters())
        self.device = parameter.device
        self._vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self._eos = eos_token_ids(served)
        self._eos_set = frozenset(self._eos)
        self.grammars = GrammarCompiler(served.tokenizer, self._eos, self._vocab_size)

        # 1. the model: batched LoRA layers in place of targeted Linears (adapters are checked
        #    before the model is touched), then our attention. With no adapters the manager
        #    wraps nothing (no cost) and is there for adapters added later.
        check_supported(self.model.config)
        # packed on the engine thread (`_loop`): oneDNN's packed weights run ~30% slower when
        # another thread packed them (measured; benchmarks/README.md)
        self._half = bool(decode_float16)
        if self._half and not can_pack(self.model):
            raise EngineError(
                "--decode-float16 applies to a float32 model on a CPU; this one is "
                f"{str(parameter.dtype).removeprefix('torch.')} on {self.device.type}"
            )
        # a bfloat16 model on a CPU: its weights stay bfloat16 in the packed Linears, keys and
        # values bfloat16 in the cache, and the rest (norms, attention, LoRA) computes in
        # float32 (cpu_linear.py)
        self._bfloat16 = can_pack(self.model, torch.bfloat16)
        if self._bfloat16:
            parameter = next(self.model.float().parameters())
        self._pack = can_pack(self.model)
        self.loras = LoRAManager(
            self.model, served.adapters, max_loras=max_loras, max_cpu_loras=max_cpu_loras
        )
        install_packed_attention(self.model)
        # our CPU kernels (cpu_kernels.py) for a float32 model on the CPU, where they build;
        # `cpu_kernels=False` keeps torch's kernels everywhere (for comparison)
        self.kernels = kernels_lib.for_model(self.model) if cpu_kernels else None
        self.loras.batch.kernels = self.kernels  # steps on many adapters: one call a module
        # Llama-family decoders run without HF's per-layer framework (lean_forward.py);
        # `lean_forward=False` keeps HF's forward (for comparison), as any other family does
        # (`direct_decode=False`: its module path for every step, not direct_decode.py's)
        self._lean = (
            LeanForward.of(self.model, self.kernels, direct_decode) if lean_forward else None
        )
        # 2. the KV cache: blocks within the memory budget (a clear error when one
        #    max-length sequence cannot fit)
        #    (bfloat16 weights on a CPU: bfloat16 keys and values, half the bytes a step reads)
        kv_dtype = torch.bfloat16 if self._bfloat16 else parameter.dtype
        shape = kv_cache_budget(
            KVCacheShape.from_config(self.model.config, num_blocks=0),
            kv_dtype,
            self.device,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
            memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization or GPU_MEMORY_UTILIZATION,
        )
        self.cache = KVCache(
            shape, dtype=kv_dtype, device=self.device, compute=parameter.dtype
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %s; one max-length sequence is %d)",
            self.cache.num_blocks,
            shape.block_size,
            shape.num_tokens,
            format_bytes(self.cache.nbytes),
            self.max_model_len,
        )
        self.scheduler = Scheduler(
            self.cache, self.loras, max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk
        )
        # this thread loaded the model and built the engine: its idle OpenMP team would slow
        # every step on the engine thread (openmp.py)
        openmp.release_thread_team()

        self._inbox: collections.deque[tuple[GenerationRequest, QueueRequestStream]] = (
            collections.deque()
        )
        self._cancels: set[str] = set()
        self._rows: dict[str, _Row] = {}
        self.steps = 0  # forwards run (for tests and metrics)
        # last: an engine that failed to start (a bad flag, an adapter, the KV budget) leaves
        # no conversion running behind its error
        self.grammars.prepare()

    # -- Engine interface (start, shutdown, submit: ThreadedEngine) ------------------------
    def _enqueue(self, request: GenerationRequest, stream: QueueRequestStream) -> None:
        self._inbox.append((request, stream))

    def stats(self) -> EngineStats:
        # snapshots: the engine thread changes these while a scrape reads them
        running = list(self.scheduler.running)
        waiting = [seq.request for seq in list(self.scheduler.waiting)]
        waiting += [request for request, _ in list(self._inbox)]
        return EngineStats(
            running=len(running),
            waiting=len(waiting),
            kv_cache_usage=1 - self.cache.num_free / self.cache.num_blocks,
            preemptions=self.scheduler.num_preemptions,
            running_adapters=distinct_adapters(seq.request.adapter for seq in running),
            waiting_adapters=distinct_adapters(request.adapter for request in waiting),
            max_loras=self.loras.max_loras,
        )

    def add_adapter(self, spec: AdapterSpec) -> None:
        try:
            layout = read_layout(spec)
            weights = load_adapter_weights(spec, layout)
        except AdapterError:
            raise
        except Exception as exc:  # a corrupt or unreadable file
            raise AdapterError(
                spec.name, f"cannot read {spec.path}: {type(exc).__name__}: {exc}"
            ) from exc

        def install() -> None:
            self.loras.install(spec, layout, weights)
            self._adapters = {**self._adapters, spec.name: spec}

        self._call(install)
        logger.info("adapter %r loaded from %s", spec.name, spec.path)

    def adapter_usage(self) -> dict[str, AdapterUsage]:
        return self.loras.usage(self._adapters)

    def _remove_adapter(self, name: str) -> None:
        self.loras.remove(name)
        # requests not started yet would only fail at admission: end them now
        with self._cond:
            arrivals = [item for item in self._inbox if item[0].adapter == name]
            for item in arrivals:
                self._inbox.remove(item)
        for request, stream in arrivals:
            stream.fail(self._unloaded(name, request.request_id))
        for seq in [s for s in self.scheduler.waiting if s.request.adapter == name]:
            row = self._rows[seq.request.request_id]
            row.stream.fail(self._unloaded(name, seq.request.request_id))
            self._end(row)

    # -- the event loop side of cancellation ----------------------------------------------
    def _on_cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    # -- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        logger.info("engine started (continuous batching, up to %d sequences)", self.max_num_seqs)
        with torch.inference_mode():
            if self._pack:
                try:
                    pack_linears(
                        self.model, self._half, self.kernels, bfloat16=self._bfloat16
                    )
                except Exception:  # the plain layers compute the same thing, only slower
                    logger.exception("packing the Linears for this CPU failed; serving unpacked")
            while True:
                with self._cond:
                    if not self._has_work():
                        # idle: no team of ours throttles another engine's in this process
                        # (openmp.py); the next step starts a new one (~0.1 ms)
                        openmp.release_thread_team()
                    while not self._has_work():
                        self._cond.wait()
                    if self._stopping:
                        break
                self._run_commands()  # before arrivals: they see the adapters as changed
                with self._cond:
                    arrivals = list(self._inbox)
                    self._inbox.clear()
                    cancels, self._cancels = self._cancels, set()
                for request, stream in arrivals:
                    try:
                        self._admit(request, stream)
                    except Exception as exc:  # e.g. a sampling setting torch refuses
                        logger.exception("request %s could not be admitted", request.request_id)
                        stream.fail(f"request {request.request_id}: {type(exc).__name__}: {exc}")
                for request_id in cancels:
                    self._cancel(request_id)
                if self.scheduler.has_work:
                    try:
                        self._step()
                    except Exception as exc:  # a bug outside the forward: fail what ran
                        logger.exception("engine step failed")
                        self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
        logger.info("engine stopped")

    def _has_work(self) -> bool:
        """Anything for the engine thread to do (called with `_cond` held)."""
        return bool(
            self._inbox
            or self._cancels
            or self._commands
            or self.scheduler.has_work
            or self._stopping
        )

    def _admit(self, request: GenerationRequest, stream: QueueRequestStream) -> None:
        """Turn a submission into a waiting Sequence, or end it at once."""
        if stream.cancelled:
            return
        if request.request_id in self._rows:
            stream.fail(f"request id {request.request_id!r} is already in flight")
            return
        problem = invalid_prompt(request, self._vocab_size, self.max_model_len)
        if problem is not None:
            stream.fail(problem)
            return
        prompt_len = len(request.prompt_ids)
        max_tokens = min(request.params.max_tokens, self.max_model_len - prompt_len)
        seq = Sequence(request=request, token_ids=list(request.prompt_ids), max_tokens=max_tokens)
        output = RequestOutput(
            request,
            self.served.tokenizer,
            eos_token_ids=self._eos_set,
            max_tokens=max_tokens,
            device=self.device,
            grammars=self.grammars,
        )
        row = _Row(seq=seq, stream=stream, output=output)
        if request.params.max_tokens < 1:
            row.push_finish("length")
            return
        self._rows[request.request_id] = row
        self.scheduler.add(seq)

    def _cancel(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self.scheduler.finish(row.seq)  # its blocks are free for the next step

    def _end(self, row: _Row) -> None:
        self._rows.pop(row.seq.request.request_id, None)
        self.scheduler.finish(row.seq)

    def _fail_all(self, message: str) -> None:
        for row in list(self._rows.values()):
            if row.seq.running:
                self._end(row)
                row.stream.fail(message)

    def _cancel_everything(self) -> None:
        with self._cond:
            left = list(self._inbox)
            self._inbox.clear()
        for _, stream in left:
            stream.push(StreamDelta(text="", finish_reason="cancelled"))
        for row in list(self._rows.values()):
            self._end(row)
            row.push_finish("cancelled")

    # -- one step --------------------------------------------------------------------------
    def _step(self) -> None:
        # one-token chunks first: the attention takes them as one batched decode
        chunks = sorted(self.scheduler.schedule(), key=lambda c: c.num_tokens > 1)
        for seq, error in self.scheduler.take_failures():
            row = self._rows.get(seq.request.request_id)
            if row is not None:
                self._end(row)
                row.stream.fail(f"request {seq.request.request_id}: {error}")
        if not chunks:
            return
        completing = [c for c in chunks if c.completes]
        try:
            logits = self._forward(chunks, completing)  # [K, V]
            rows = [self._rows[c.seq.request.request_id] for c in completing]
            sampled = sample(logits, [row.output.sampling for row in rows], self._eos)
        except Exception as exc:
            logger.exception("a step of %d sequence(s) failed", len(chunks))
            for chunk in chunks:
                row = self._rows.get(chunk.seq.request.request_id)
                if row is not None:
                    self._end(row)
                    row.stream.fail(f"generation failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self.loras.batch.clear()
        self.steps += 1
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
        for row, token, logprob in zip(rows, sampled.tokens, sampled.logprobs, strict=True):
            row.seq.token_ids.append(token)
            delta = row.output.add(token, logprob)
            if delta.finish_reason is not None:
                # retired before its reader can see the end: a client that reads /metrics after
                # its response never finds its request still counted as running
                self._end(row)
            row.stream.push(delta)

    def _forward(
        self, chunks: list[ScheduledChunk], completing: list[ScheduledChunk]
    ) -> torch.Tensor:
        """One packed forward of every chunk; the logits of each completing chunk's last token."""
        ids: list[int] = []
        keep: list[int] = []
        token_lora: list[int] = []
        keep_lora: list[int] = []
        rows: list[RowChunk] = []
        for chunk in chunks:
            seq = chunk.seq
            ids.extend(seq.token_ids[chunk.start : chunk.start + chunk.num_tokens])
            token_lora.extend([seq.lora_slot] * chunk.num_tokens)
            rows.append(RowChunk(seq.blocks, chunk.start, chunk.num_tokens))
            if chunk.completes:
                keep.append(len(ids) - 1)
                keep_lora.append(seq.lora_slot)
        step = PackedStep.build(self.cache, rows, self.device, self.kernels)
        self.loras.batch.set(token_lora, keep_lora, self.device)
        keep_index = torch.tensor(keep or [len(ids) - 1], dtype=torch.long, device=self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [N]
        logits: torch.Tensor
        if self._lean is not None:
            logits = self._lean(input_ids, step, keep_index)  # [K, V]
        else:
            logits = self.model(
                input_ids=input_ids[None],  # [1, N]
                position_ids=step.positions[None],  # [1, N]
                use_cache=False,
                logits_to_keep=keep_index,  # [K]
                **{STEP_KWARG: step},
            ).logits[0]  # [K, V]
        return logits if keep else logits[:0]
