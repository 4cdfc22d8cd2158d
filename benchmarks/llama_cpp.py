"""llama.cpp as a peer: `llama-server` built from the vendored llama.cpp of the llama-cpp-python
sdist (PyPI is reachable here, GitHub is not), once, into `<cache>/llama.cpp-<version>/`.

    python -m benchmarks build-llama-cpp        # ~9 minutes on 2 cores; later runs reuse it

The build is opt-in: a run that asks for the `llama.cpp` system without it stops with this
command. The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`) come from the same
sdist, so the weights and the binary always match.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import httpx

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is what we build
TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")
INDEX = "https://pypi.org/simple/llama-cpp-python/"
BUILD_HINT = "python -m benchmarks build-llama-cpp"


def root(cache_dir: Path) -> Path:
    return cache_dir / f"llama.cpp-{VERSION}"


def server_binary(cache_dir: Path) -> Path | None:
    """The built llama-server, or None when `build-llama-cpp` has not run."""
    path = root(cache_dir) / "build" / "bin" / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def source(cache_dir: Path) -> Path:
    """The vendored llama.cpp source tree (downloaded and unpacked on first use)."""
    src = root(cache_dir) / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    root(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root(cache_dir)) as tmp:
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


def build(cache_dir: Path, jobs: int | None = None) -> Path:
    """Configure and build the targets (cmake + gcc); returns llama-server's path."""
    found = server_binary(cache_dir)
    if found:
        return found
    src, out = source(cache_dir), root(cache_dir) / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_CURL=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(out), "-j", str(jobs or os.cpu_count() or 2),
                    "--target", *TARGETS], check=True)
    found = server_binary(cache_dir)
    if not found:
        raise RuntimeError(f"the build finished but {out}/bin/llama-server is missing")
    return found
