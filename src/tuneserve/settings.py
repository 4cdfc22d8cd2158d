"""One settings object for `tuneserve serve`: flags override TUNESERVE_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import ByteSize, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneserve.engine.registry import DEFAULT_ENGINE, engine_names, engines_help

# How long `tuneserve serve` drains after SIGTERM; the deploy templates' grace periods follow it.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("tuneserve"))


class ServeSettings(BaseSettings):
    """What `tuneserve serve` serves and how. Every field reads TUNESERVE_<NAME> too."""

    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", extra="ignore")

    base: str | None = Field(
        None, description="Base model: a local folder, a .gguf file (converted once) or a hub id."
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapters as NAME=PATH (env: TUNESERVE_ADAPTERS as a JSON list).",
    )
    workspace: Path | None = Field(None, description="An AI Toolkit workspace folder.")
    served_model_name: str | None = Field(None, description="The base model's id in the API.")
    dtype: Dtype = "auto"
    device: Device = "auto"
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    api_key: str | None = Field(None, description="Bearer key required by /v1/* and the UI.")
    admin_key: str | None = Field(
        None, description="Bearer key for /v1/adapters (default: the API key)."
    )
    adapter_root: Path | None = Field(
        None,
        description="The folder adapters are loaded from at runtime (default: the workspace's "
        "models/, or the demo's adapters).",
    )
    adapter_rescan_interval: float = Field(
        10.0, ge=0, description="Seconds between rescans of the adapter root (0: only on demand)."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (default: the model's)."
    )
    engine: str = Field(DEFAULT_ENGINE, description=engines_help())
    max_num_seqs: int = Field(32, ge=1, description="Most sequences decoded together.")
    max_loras: int = Field(8, ge=1, description="Adapters held hot in the engine's LoRA slots.")
    max_cpu_loras: int | None = Field(None, ge=1, description="Adapters kept in CPU memory.")
    kv_cache_memory: ByteSize | None = Field(
        None,
        gt=0,
        description="Memory for the KV cache, e.g. 2GiB [default: on CUDA "
        "--gpu-memory-utilization, on CPU 4GiB].",
    )
    # None: the engine's defaults (engine/kv_cache.py, engine/continuous.py)
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of the GPU's memory the server may fill, KV included."
    )
    prefill_chunk: int | None = Field(
        None, ge=1, description="Most prompt tokens fed in one step (bounds the decode stall)."
    )
    decode_float16: bool | None = Field(
        None,
        description="CPU, float32: also keep float16 weights for steps of 1-4 tokens.",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)
    open_admin: bool = Field(
        False,
        description="Open the admin routes (/v1/adapters) without a key, for a trusted network.",
    )
    shutdown_timeout: float = Field(
        DEFAULT_SHUTDOWN_TIMEOUT_S,
        ge=0,
        description="Seconds running requests may take to finish after SIGTERM (the platform's "
        "grace period).",
    )
    ui: bool = Field(True, description="Mount the Gradio chat UI at /.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in engine_names():
            raise ValueError(f"unknown engine {value!r}; choose one of {', '.join(engine_names())}")
        return value

    @field_validator("adapters")
    @classmethod
    def _name_equals_path(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(
                    f"adapter {item!r} must be NAME=PATH, e.g. pirate=./adapters/pirate"
                )
        return value

    def adapter_paths(self) -> dict[str, Path]:
        pairs = (item.partition("=") for item in self.adapters)
        return {name.strip(): Path(path.strip()).expanduser() for name, _, path in pairs}
