"""Constrained decoding: JSON schemas, regexes, choices and grammars enforced token by token.

llguidance (the grammar engine behind the structured output of vLLM, SGLang and llama.cpp) does
the work. A `Constraint` becomes an llguidance grammar; per tokenizer one `LLTokenizer` (built
once, about half a second for a 49k vocabulary); per request one `LLMatcher` that gives the
tokens allowed next and consumes the token drawn. A mask costs 0.02-0.2 ms per row and step
here (about 2 ms for a request's first), against ~60 ms for a step of the real model.

Why llguidance: its masks come from the tokenizer's JSON alone, for any fast tokenizer, and
its wheel (abi3, 3 MB) has no dependencies; xgrammar's pulls in triton. Outlines-core
compiles an index per schema up front, seconds for a large schema.

JSON is generated without free whitespace (`{"a": 1, "b": [2, 3]}`): a small model offered
whitespace can emit it until max_tokens; the output still parses the same.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from tuneserve.engine.grammar import ConstraintError, grammar_of
from tuneserve.engine.types import Constraint

# compiled grammars kept per engine (a matcher is copied from them per request)
CACHED_GRAMMARS = 64


class GrammarCompiler:
    """One engine's matchers (used on its thread): the tokenizer converted once (`prepare`
    starts that in the background), compiled grammars cached."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int], vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self.vocab_size = vocab_size
        self._ll_tokenizer: LLTokenizer | None = None
        self._ll_lock = threading.Lock()
        self._compiled: collections.OrderedDict[Constraint, LLMatcher] = collections.OrderedDict()

    def prepare(self) -> None:
        """Convert the tokenizer on a thread of its own now: done on the engine thread at the
        first constrained request, it would stall every running row (~0.5 s for 49k tokens).
        Not a daemon: an exit waits for it (native code still running while the interpreter
        shuts down crashed a process that exited with an error right after starting it)."""
        threading.Thread(target=self._ll, name="tuneserve-grammar").start()

    def _ll(self) -> LLTokenizer:
        with self._ll_lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            return self._ll_tokenizer

    def matcher(self, constraint: Constraint) -> LLMatcher:
        """A fresh matcher at the start of `constraint`; raises ConstraintError."""
        compiled = self._compiled.get(constraint)
        if compiled is None:
            compiled = LLMatcher(self._ll(), grammar_of(constraint), log_level=0)
            if compiled.is_error():
                raise ConstraintError(compiled.get_error())
            self._compiled[constraint] = compiled
            if len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(constraint)
        return compiled.deep_copy()


def allowed_tokens(matchers: Sequence[LLMatcher], vocab_size: int) -> torch.Tensor:
    """[R, vocab_size] bool: the tokens each matcher allows next."""
    words = (vocab_size + 31) // 32
    bits = np.zeros((len(matchers), words), dtype=np.int32)
    for row, matcher in zip(bits, matchers, strict=True):
        matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(allowed).bool()
