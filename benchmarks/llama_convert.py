"""Runs one of llama.cpp's converter scripts (from the vendored source) on several jobs in one
process, as `python SCRIPT ARGS...` would run each:

    python -m benchmarks.llama_convert SRC/convert_lora_to_gguf.py '[["--base", "B", "A0"], ...]'

The scripts import their `gguf` package from beside them (the sdist's own gguf-py, not the one
installed in the environment), and `sentencepiece` for every Llama model, even one without a
`tokenizer.model` file, only to find that file missing and fall back to tokenizer.json. Neither
bench model has one, so sentencepiece is not installed: when it is missing, the file check runs
first and the fallback happens without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import runpy
import sys
from pathlib import Path
from typing import Any


def _sentencepiece_only_when_needed() -> None:
    base: Any = importlib.import_module("conversion.base")
    original = base.TextModel._create_vocab_sentencepiece

    def create_vocab_sentencepiece(self: Any) -> Any:
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return original(self)  # needs sentencepiece: fails naming it, as the script would

    base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    script, jobs = Path(argv[0]), json.loads(argv[1])
    # What `python SCRIPT` sets up: its folder first (for `conversion`), then its own gguf-py.
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
    if importlib.util.find_spec("sentencepiece") is None:
        _sentencepiece_only_when_needed()
    for args in jobs:
        sys.argv = [str(script), *args]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
