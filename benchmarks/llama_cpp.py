"""llama.cpp as a peer: `llama-server` built from the vendored llama.cpp of the llama-cpp-python
sdist (PyPI is reachable here, GitHub is not), once, into `benchmarks/out/llama.cpp-<version>/`
(`--llama-cpp-dir`; kept apart from the models' `--cache-dir`, so one build serves every cache).

    python -m benchmarks build-llama-cpp        # ~9 minutes on 2 cores; later runs reuse it

The build is opt-in: a run that asks for a `llama.cpp` system without it skips that system with
this command as the reason. The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`)
come from the same sdist, so the weights and the binary always match; what they write is cached
beside the bench model, in `<model root>/llama.cpp-<version>/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.model import BenchModel
from benchmarks.procs import StartError, tail

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is what we build
TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")
INDEX = "https://pypi.org/simple/llama-cpp-python/"
BUILD_HINT = "python -m benchmarks build-llama-cpp"
DEFAULT_HOME = Path(__file__).resolve().parent / "out" / f"llama.cpp-{VERSION}"
REPO = Path(__file__).resolve().parent.parent
# Each slot's context holds its prompt and its new tokens; the margin covers a tokenizer that
# makes a token more than asked and keeps a full slot from shifting its context.
CTX_MARGIN = 64


def server_binary(home: Path = DEFAULT_HOME) -> Path | None:
    """The built llama-server, or None when `build-llama-cpp` has not run."""
    path = home / "build" / "bin" / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def build_hint(home: Path) -> str:
    """The command that builds llama-server into `home`."""
    if home.resolve() == DEFAULT_HOME:
        return BUILD_HINT
    return f"{BUILD_HINT} --llama-cpp-dir {home}"


def server_env(binary: Path) -> dict[str, str]:
    """llama-server finds its shared libraries beside it. The build writes their folder into the
    binary as an absolute RUNPATH; LD_LIBRARY_PATH wins over it, so a moved build still runs."""
    found = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": str(binary.parent) + (f":{found}" if found else "")}


def source(home: Path = DEFAULT_HOME) -> Path:
    """The vendored llama.cpp source tree (downloaded and unpacked on first use)."""
    src = home / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        sdist = Path(tmp) / f"llama_cpp_python-{VERSION}.tar.gz"
        _download_sdist(sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        (Path(tmp) / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp").rename(src)
    return src


def _download_sdist(dest: Path) -> None:
    """The sdist from PyPI's simple index, checked against the index's sha256.

    (Not `pip download`: it would build the sdist's metadata, and with `--no-binary :all:` every
    build dependency from source too.)
    """
    index = httpx.get(INDEX, timeout=60, follow_redirects=True)
    index.raise_for_status()
    found = re.search(rf'href="([^"]*/{re.escape(dest.name)})#sha256=([0-9a-f]{{64}})"', index.text)
    if not found:
        raise RuntimeError(f"{INDEX} lists no {dest.name}")
    url, sha256 = found.groups()
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=600, follow_redirects=True) as response, \
            open(dest, "wb") as out:
        response.raise_for_status()
        for block in response.iter_bytes(1 << 20):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{url}: sha256 {digest.hexdigest()}, the index says {sha256}")


def build(home: Path = DEFAULT_HOME, jobs: int | None = None) -> Path:
    """Configure and build the targets (cmake + gcc); returns llama-server's path."""
    found = server_binary(home)
    if found:
        return found
    src, out = source(home), home / "build"
    # RPATH_USE_ORIGIN: the binaries find their libraries relative to themselves, so the
    # folder may be moved later.
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"], check=True)
    subprocess.run(["cmake", "--build", str(out), "-j", str(jobs or os.cpu_count() or 2),
                    "--target", *TARGETS], check=True)
    found = server_binary(home)
    if not found:
        raise RuntimeError(f"the build finished but {out}/bin/llama-server is missing")
    return found


# --- the weights, converted by the sdist's own scripts ------------------------------------------


def gguf_dir(bench: BenchModel) -> Path:
    """Where the converted files of this bench model live (beside its adapters)."""
    return bench.root / f"llama.cpp-{VERSION}"


def base_gguf(home: Path, bench: BenchModel, outtype: str) -> Path:
    """The bench base as GGUF (`outtype` f32, f16 or bf16), converted once by
    convert_hf_to_gguf.py."""
    dest = gguf_dir(bench) / f"base-{outtype}.gguf"
    with _convertible(bench.base) as base:
        _convert(home, "convert_hf_to_gguf.py", {dest: [str(base), "--outtype", outtype]})
    return dest


def adapter_ggufs(home: Path, bench: BenchModel, names: list[str], outtype: str) -> list[Path]:
    """The named adapters as GGUF LoRA files (convert_lora_to_gguf.py), in the order given."""
    dests = [gguf_dir(bench) / "adapters" / f"{name}-{outtype}.gguf" for name in names]
    with _convertible(bench.base) as base:
        _convert(home, "convert_lora_to_gguf.py", {
            dest: ["--base", str(base), "--outtype", outtype, str(bench.adapters[name])]
            for dest, name in zip(dests, names, strict=True)})
    return dests


@contextlib.contextmanager
def _convertible(base: Path) -> Iterator[Path]:
    """`base`, or a copy of it the converters accept. They refuse a config.json that still names
    the GGUF quantizer (what a tuneserve-converted GGUF base carried before it dropped the key):
    the copy has the key removed and links to every other file."""
    config = json.loads((base / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "gguf":
        yield base
        return
    with tempfile.TemporaryDirectory(prefix="llama-cpp-base-") as tmp:
        for path in base.iterdir():
            if path.name != "config.json":
                (Path(tmp) / path.name).symlink_to(path.resolve())
        del config["quantization_config"]
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2))
        yield Path(tmp)


def _convert(home: Path, script: str, jobs: dict[Path, list[str]]) -> None:
    """Run one converter over the jobs (output file -> arguments) whose output is missing, all in
    one process (each start imports torch: seconds). Each file is written under a temporary
    name and renamed when the process succeeds, so a crash leaves no half file behind."""
    todo = {dest: args for dest, args in jobs.items() if not dest.is_file()}
    if not todo:
        return
    tmps = {dest: dest.with_name(f".{dest.name}.tmp") for dest in todo}
    argv_lists = [[*args, "--outfile", str(tmps[dest])] for dest, args in todo.items()]
    log = next(iter(todo)).parent / "convert.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "benchmarks.llama_convert", str(source(home) / script),
            json.dumps(argv_lists)]
    with open(log, "ab") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise StartError(f"{script} failed (exit code {proc.returncode}); log {log}:\n"
                         f"{tail(log)}")
    for dest, tmp in tmps.items():
        os.replace(tmp, dest)


# --- the server ----------------------------------------------------------------------------------


def context_size(max_concurrency: int, prompt_len: int, max_tokens: int) -> int:
    """llama-server's --ctx-size: with --parallel N (and no --kv-unified) it splits the context
    evenly among the N slots, so each slot needs its prompt, its new tokens and the margin."""
    return max_concurrency * (prompt_len + max_tokens + CTX_MARGIN)


def threads() -> int:
    """Physical cores, as llama.cpp's own default and torch's (hyperthreads slow ggml down)."""
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def server_argv(binary: Path, model: Path, loras: list[Path], port: int, parallel: int,
                ctx_size: int, n_threads: int) -> list[str]:
    """llama-server on `model` with the LoRA files loaded but not applied: a request picks its
    adapter with `lora` (an adapter listed at --lora is applied to every request that names
    none, unless --lora-init-without-apply)."""
    argv = [str(binary), "--model", str(model)]
    if loras:
        # One --lora with every path, comma-separated: given several --lora flags, llama-server
        # keeps only the last (it warns "only last value will be used").
        bad = [str(p) for p in loras if "," in str(p) or '"' in str(p)]
        if bad:
            raise StartError(f"llama-server's --lora list cannot hold a path with ',' or '\"': "
                             f"{bad[0]} (move the --cache-dir)")
        argv += ["--lora", ",".join(map(str, loras)), "--lora-init-without-apply"]
    return argv + ["--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
                   "--ctx-size", str(ctx_size), "--threads", str(n_threads),
                   "--threads-batch", str(n_threads), "--no-webui"]
