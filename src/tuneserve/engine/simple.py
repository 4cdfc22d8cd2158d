"""The simple engine: static batches through Hugging Face transformers + PEFT on one thread.

Token ids in, text deltas out (engine/types.py); it knows nothing of HTTP. One batch:

1. take up to `max_batch_size` waiting requests;
2. prefill: the prompts left-padded into one [B, T] forward that fills a DynamicCache;
3. decode: one token per row per step, every row through its own adapter in the same
   forward (PEFT's mixed-batch `adapter_names=`, "__base__" for none);
4. a finished row (EOS, stop string, max_tokens, cancel) leaves the batch at once: its
   cache rows are dropped, so it costs nothing in later steps.

This is static batching: a request that arrives while a batch runs waits for the next
batch. The continuous-batching engine replaces this file; sampling.py, detokenize.py and
stream.py are shared.

Adapters change between batches and between decode steps (`add_adapter`, `remove_adapter`).
Every loaded version gets its own PEFT adapter name ("v1", "v2", ...: PEFT names cannot hold
"." and public names may); a row records its version when its batch starts, so a replace
mid-batch leaves running rows on the old version, which PEFT drops once no row uses it. With
no adapter left, the model is unwrapped back to the bare base model.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict
from transformers import DynamicCache

from tuneserve.engine.grammar import ConstraintError
from tuneserve.engine.output import RequestOutput, eos_token_ids, invalid_prompt
from tuneserve.engine.sampling import sample
from tuneserve.engine.stream import QueueRequestStream
from tuneserve.engine.structured import GrammarCompiler
from tuneserve.engine.threaded import ThreadedEngine
from tuneserve.engine.types import (
    AdapterUsage,
    EngineStats,
    FinishReason,
    GenerationRequest,
    StreamDelta,
    TokenLogprob,
    distinct_adapters,
)
from tuneserve.errors import AdapterError
from tuneserve.models.adapters import (
    CONFIG_FILE,
    read_adapter_config,
    read_tensors,
    weights_file,
)
from tuneserve.models.types import AdapterSpec, LoadedModel

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's row name for "no adapter" in a mixed batch


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        # deleting the active adapter: PEFT picks another one itself, and says so
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    """An adapter's config and weights read from its folder, not yet in the model."""

    spec: AdapterSpec
    config: LoraConfig
    weights: dict[str, torch.Tensor]


def read_adapter(spec: AdapterSpec, device: str | torch.device) -> LoadedAdapter:
    """Read the folder's config and weights (the slow part of loading: no model involved)."""
    folder = Path(spec.path)
    raw, _ = read_adapter_config(spec.name, folder / CONFIG_FILE)
    file = weights_file(spec.name, folder)
    weights = {key: tensor.to(device) for key, tensor in read_tensors(spec.name, file).items()}
    # runtime_config holds one run's settings, not the adapter's: PEFT's own loader drops it too
    fields = {key: value for key, value in raw.items() if key != "runtime_config"}
    try:
        config = LoraConfig.from_peft_type(**fields)
    except Exception as exc:  # a config PEFT cannot build: the same to the user as a bad file
        raise AdapterError(
            spec.name, f"PEFT cannot read {folder / CONFIG_FILE}: {type(exc).__name__}: {exc}"
        ) from exc
    config.inference_mode = True
    # modules the file has no weights for must add nothing (as in the continuous engine)
    config.init_lora_weights = True
    return LoadedAdapter(spec, config, weights)


# -- the model steps (free functions, shapes in comments) ----------------------------------
def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch (the last column is real)."""
    # -> input_ids [B, T], attention_mask [B, T] (1 = real token)
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position counted from its row's first real token (as generate)."""
    # attention_mask: [B, T] -> position_ids [B, T]; pads get 1 (masked, any value works)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
    adapter_names: list[str] | None,
) -> torch.Tensor:
    """One forward that extends `cache`; returns the logits of each row's last token."""
    # input_ids, position_ids: [B, t]; attention_mask: [B, past + t] -> logits [B, V]
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    logits: torch.Tensor = out.logits
    return logits[:, -1, :]


# -- per-request bookkeeping ------------------------------------------------------------
@dataclass(eq=False)
class _Pending:
    """A submitted request and its stream, until the request has finished."""

    request: GenerationRequest
    stream: QueueRequestStream
    finished: bool = False

    def finish(self, reason: FinishReason) -> None:
        """End a request that never generated (cancelled, or max_tokens 0)."""
        self.stream.push(
            StreamDelta(text="", finish_reason=reason, prompt_tokens=len(self.request.prompt_ids))
        )
        self.finished = True


@dataclass(eq=False)
class _Row:
    """One request inside a running batch."""

    pending: _Pending
    output: RequestOutput
    adapter: str  # the PEFT name of the version it started with, or BASE_ADAPTER

    def step(self, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Account one generated token, send its delta; True when the row has ended."""
        delta = self.output.add(token_id, logprob)
        self.pending.stream.push(delta)
        self.pending.finished = delta.finish_reason is not None
        return self.pending.finished


class PeftBatchEngine(ThreadedEngine):
    """Static batching over a PEFT-wrapped transformers model (see the module docstring)."""

    def __init__(self, served: LoadedModel, max_batch_size: int = 16) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        super().__init__(served)
        self.max_batch_size = max_batch_size
        self._device = torch.device(served.device)
        self._vocab_size = int(served.model.get_input_embeddings().num_embeddings)
        tokenizer = served.tokenizer
        self._eos = eos_token_ids(served)
        self.grammars = GrammarCompiler(tokenizer, self._eos, self._vocab_size)
        self.grammars.prepare()
        self._pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._running = 0
        self._running_adapters: tuple[str, ...] = ()
        # the adapters: the model is the bare base model until the first one arrives
        self.model: Any = served.model.eval()
        self._versions: dict[str, str] = {}  # public name -> PEFT name of the served version
        self._version_count = 0
        self._retired: set[str] = set()  # PEFT names no longer served, still used by rows
        self._in_use: collections.Counter[str] = collections.Counter()  # the batch's rows
        self._last_used: dict[str, float] = {}
        self._adapters = {}
        for spec in served.adapters.values():
            self._call(functools.partial(self._install, read_adapter(spec, self._device)))

    # -- Engine interface (start, shutdown, submit: ThreadedEngine) ------------------------
    def _enqueue(self, request: GenerationRequest, stream: QueueRequestStream) -> None:
        self._waiting.append(_Pending(request, stream))

    def _cancel_everything(self) -> None:
        with self._cond:
            left = list(self._waiting)
            self._waiting.clear()
        for pending in left:
            pending.finish("cancelled")

    def stats(self) -> EngineStats:
        waiting = list(self._waiting)
        return EngineStats(
            running=self._running,
            waiting=len(waiting),
            running_adapters=self._running_adapters,
            waiting_adapters=distinct_adapters(p.request.adapter for p in waiting),
            # PEFT keeps every adapter in the model: all of them can run in one batch
            max_loras=len(self._adapters),
        )

    def add_adapter(self, spec: AdapterSpec) -> None:
        loaded = read_adapter(spec, self._device)
        self._call(lambda: self._install(loaded))
        logger.info("adapter %r loaded from %s", spec.name, spec.path)

    def adapter_usage(self) -> dict[str, AdapterUsage]:
        # PEFT keeps every adapter in the model: all of them are hot
        last = dict(self._last_used)
        return {name: AdapterUsage("hot", last.get(name)) for name in self._adapters}

    # -- adapter versions (commands: engine thread, or before it starts) ------------------
    @property
    def _uses_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

    def _install(self, loaded: LoadedAdapter) -> None:
        spec = loaded.spec
        self.validate_adapter(spec)  # the engine's own guard: cheap
        self._version_count += 1
        version = f"v{self._version_count}"
        try:
            with _quiet_peft():
                if self._uses_peft:
                    self.model.add_adapter(version, loaded.config)
                else:
                    self.model = PeftModel(self.model, loaded.config, adapter_name=version)
                result: Any = set_peft_model_state_dict(
                    self.model, loaded.weights, adapter_name=version
                )
            if result.unexpected_keys:
                raise AdapterError(
                    spec.name,
                    f"{spec.path}: weight {result.unexpected_keys[0]!r} matches no LoRA layer "
                    "of the model",
                )
        except Exception as exc:
            self._delete_version(version)
            if isinstance(exc, AdapterError):
                raise
            raise AdapterError(
                spec.name, f"PEFT could not load {spec.path}: {type(exc).__name__}: {exc}"
            ) from exc
        self.model.eval()
        old = self._versions.get(spec.name)
        self._versions[spec.name] = version
        if old is not None:
            self._retire(old)
        self._adapters = {**self._adapters, spec.name: spec}

    def _remove_adapter(self, name: str) -> None:
        self._retire(self._versions.pop(name))
        self._last_used.pop(name, None)
        with self._cond:
            doomed = [p for p in self._waiting if p.request.adapter == name]
            for pending in doomed:
                self._waiting.remove(pending)
        for pending in doomed:
            pending.stream.fail(self._unloaded(name, pending.request.request_id))
            pending.finished = True

    def _retire(self, version: str) -> None:
        """`version` is no longer served; PEFT drops it once no running row uses it."""
        self._retired.add(version)
        self._reap()

    def _reap(self) -> None:
        for version in [v for v in self._retired if not self._in_use[v]]:
            self._retired.discard(version)
            try:
                self._command_mode(functools.partial(self._delete_version, version))
            except Exception:  # it stays in the model, unused: serving goes on
                logger.exception("PEFT could not delete the unloaded adapter version %s", version)

    def _delete_version(self, version: str) -> None:
        """Take `version` out of the PEFT model; unwrap the model when no adapter is left."""
        if not self._uses_peft:
            return
        model = self.model
        with _quiet_peft():
            if version in model.peft_config:
                model.delete_adapter(version)
            else:  # a half-done add: PEFT forgot the config but layers may hold the weights
                for module in model.modules():
                    if isinstance(module, BaseTunerLayer) and version in getattr(
                        module, "lora_A", {}
                    ):
                        module.delete_adapter(version)
            if not model.peft_config:
                self.model = model.unload().eval()
            elif model.active_adapter not in model.peft_config:
                # PEFT runs mixed batches only while some adapter is active
                model.set_adapter(next(iter(model.peft_config)))

    # -- the engine thread ------------------------------------------------------------------
    def _on_cancel(self, request_id: str) -> None:
        """A request cancelled before its batch started never enters one."""
        with self._cond:
            for pending in self._waiting:
                if pending.request.request_id == request_id:
                    self._waiting.remove(pending)
                    break

    def _take_batch(self) -> list[_Pending]:
        """Up to max_batch_size waiting requests (maybe none)."""
        with self._cond:
            batch: list[_Pending] = []
            while self._waiting and len(batch) < self.max_batch_size:
                batch.append(self._waiting.popleft())
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        logger.info("engine started (static batches of up to %d)", self.max_batch_size)
        while True:
            with self._cond:
                while not (self._waiting or self._commands or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
            self._run_commands()  # before the batch starts: it sees the adapters as changed
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception as exc:
                logger.exception("a batch of %d request(s) failed", len(batch))
                for pending in batch:
                    if not pending.finished:
                        pending.stream.fail(f"generation failed: {type(exc).__name__}: {exc}")
                        pending.finished = True
            finally:
                self._running, self._running_adapters = 0, ()
                self._in_use.clear()
                self._reap()
        logger.info("engine stopped")

    def _admit(self, batch: list[_Pending]) -> list[_Row]:
        """Rows for the requests that can run; the others are finished here."""
        rows: list[_Row] = []
        for pending in batch:
            request = pending.request
            version = (
                BASE_ADAPTER if request.adapter is None else self._versions.get(request.adapter)
            )
            if pending.stream.cancelled:
                pending.finish("cancelled")
            elif (problem := invalid_prompt(request, self._vocab_size)) is not None:
                pending.stream.fail(problem)
                pending.finished = True
            elif version is None:
                pending.stream.fail(self._unloaded(str(request.adapter), request.request_id))
                pending.finished = True
            elif request.params.max_tokens < 1:
                pending.finish("length")
            else:
                try:
                    output = RequestOutput(
                        request,
                        self.served.tokenizer,
                        eos_token_ids=frozenset(self._eos),
                        max_tokens=request.params.max_tokens,
                        device=self._device,
                        grammars=self.grammars,
                    )
                except ConstraintError as exc:
                    pending.stream.fail(f"request {request.request_id}: {exc}")
                    pending.finished = True
                    continue
                rows.append(_Row(pending, output, version))
                if request.adapter is not None:
                    self._last_used[request.adapter] = time.time()
        self._in_use = collections.Counter(row.adapter for row in rows)
        self._running_adapters = distinct_adapters(r.pending.request.adapter for r in rows)
        return rows

    @torch.inference_mode()
    def _run_batch(self, batch: list[_Pending]) -> None:
        rows = self._admit(batch)
        if not rows:
            return
        # 1. prefill: all prompts in one left-padded forward
        prompts = [row.pending.request.prompt_ids for row in rows]
        input_ids, attention_mask = left_pad(prompts, self._pad_id, self._device)  # [B, T]
        adapters = [row.adapter for row in rows]
        cache = DynamicCache(config=self.model.config)
        logits = forward(
            self.model,
            input_ids,
            attention_mask,
            positions_from_mask(attention_mask),
            cache,
            adapters if self._uses_peft else None,
        )  # [B, V]
        positions = attention_mask.sum(-1, keepdim=True)  # [B, 1]: the next token's position

        # 2. decode: sample, emit, drop finished rows, one forward for the rest
        while True:
            sampled = sample(logits, [row.output.sampling for row in rows], self._eos)
            keep = []
            for i, (row, token_id, logprob) in enumerate(
                zip(rows, sampled.tokens, sampled.logprobs, strict=True)
            ):
                if row.step(token_id, logprob):
                    continue
                if row.pending.stream.cancelled or self._stopping:
                    row.pending.stream.push(row.output.finish("cancelled"))
                    row.pending.finished = True
                    continue
                keep.append(i)
            tokens = torch.tensor(sampled.tokens, device=self._device)  # [B]
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self._device)
                cache.batch_select_indices(index)
                rows = [rows[i] for i in keep]
                adapters = [adapters[i] for i in keep]
                tokens, positions = tokens[index], positions[index]
                attention_mask = attention_mask[index]
                self._running = len(rows)
                self._running_adapters = distinct_adapters(r.pending.request.adapter for r in rows)
                self._in_use = collections.Counter(adapters)
                self._reap()  # versions retired mid-batch that only the finished rows used
            # adapters may change here; this batch's rows keep the versions they started with
            self._run_commands()
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], 1)
            names = adapters if self._uses_peft else None
            logits = forward(self.model, tokens[:, None], attention_mask, positions, cache, names)
            positions = positions + 1
