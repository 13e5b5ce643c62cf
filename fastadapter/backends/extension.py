"""Building and loading the C++/CUDA extension of ``csrc/``.

Compiled on first use with ``torch.utils.cpp_extension.load`` (ninja) into a cache
directory per torch version, Python version and CUDA-ness. Builds into one directory take
turns under an advisory file lock (flock), which the system releases when its process
dies: torch's own build lock is a plain file that a killed build leaves behind, and every
later build would wait on it forever, so one found while holding the flock is stale and
removed. A prebuilt ``fastadapter._C`` (setup.py
with FASTADAPTER_BUILD_EXT=1) is used when present. Machines without CUDA build only
the CPU part. Any failure is kept as a reason string, never raised at import.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("fastadapter")

CPU_SOURCES = (
    "binding.cpp", "adapter_cpu.cpp", "adapter_layernorm_cpu.cpp", "adapter_rmsnorm_cpu.cpp", "cpu_activation.cpp",
    "cpu_residual_gemm.cpp", "cpu_weight_grad.cpp", "mixed_adapter_cpu.cpp",
)  # fmt: skip
CUDA_SOURCES = ("adapter_cuda.cu", "adapter_cuda_binding.cpp")


def csrc_dir() -> Optional[Path]:
    here = Path(__file__).resolve().parent.parent  # the fastadapter package
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "adapter_cpu.cpp").is_file():
            return candidate
    return None


def want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return (
        torch.version.cuda is not None
        and torch.cuda.is_available()
        and CUDA_HOME is not None
        and os.environ.get("FASTADAPTER_NO_CUDA_EXT", "0") != "1"
    )


def openmp_flags() -> list[str]:
    """-fopenmp when torch runs its CPU threads with OpenMP (Linux wheels): at::parallel_for
    in an extension compiled without it runs every range on the calling thread."""
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _cpu_tag() -> str:
    """A short hash of the CPU's feature flags: the build uses -march=native, so a cache
    directory shared between different CPUs must not hand one CPU's build to another."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _source_tag(sources: list[str], flags: list[str]) -> str:
    """A short hash of the sources, the headers beside them and the flags: two checkouts
    with different sources never share a build, two with the same ones do."""
    h = hashlib.sha1(" ".join(flags).encode())
    folders = sorted({os.path.dirname(s) for s in sources})
    headers = [os.path.join(d, f) for d in folders for f in sorted(os.listdir(d)) if f.endswith((".h", ".cuh"))]
    for path in sorted(sources) + headers:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:8]


def build_dir(name: str, source_tag: str = "") -> Path:
    root = os.environ.get("FASTADAPTER_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastadapter"
    )
    tag = f"{name}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{_cpu_tag()}".replace("+", "_")
    tag += f"-src{source_tag}" if source_tag else ""
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_turn(path: Path):
    """Holds the build directory's flock for the block (a no-op where there is no fcntl),
    and removes the `lock` file torch's build left behind if its process was killed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's lock file alone
        yield
        return
    with open(path / "fastadapter.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = path / "lock"
            if stale.exists():  # no build of ours runs (we hold the flock): a killed one left it
                logger.warning("fastadapter: removing %s, left by an interrupted build", stale)
                stale.unlink()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def plan(src: Path) -> tuple[str, list[str], list[str], Path]:
    """The extension's name, sources, compiler flags and build directory for the sources in ``src``."""
    cuda = want_cuda()
    name = "fastadapter_C_cuda" if cuda else "fastadapter_C"
    sources = [str(src / s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    # built on the machine that runs it: -march=native lets the epilogue loops use its vector width
    flags = ["-O3", "-march=native", *openmp_flags()] + (["-DFASTADAPTER_WITH_CUDA"] if cuda else [])
    return name, sources, flags, build_dir(name, _source_tag(sources, flags))


def build(src: Path):
    """The extension built from the sources in ``src`` (cached per source version and flags)
    and loaded; raises where it cannot be built or loaded."""
    from torch.utils.cpp_extension import load as jit_load

    name, sources, flags, directory = plan(src)
    fresh = not (directory / f"{name}.so").exists()
    if fresh:  # minutes of silence otherwise: say why
        print(f"fastadapter: building the C++ extension {name} in {directory} (once per source version; "
              f"about a minute or two)", file=sys.stderr, flush=True)  # fmt: skip
    started = time.perf_counter()
    with build_turn(directory):
        module = jit_load(
            name=name,
            sources=sources,
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "-DFASTADAPTER_WITH_CUDA"],
            extra_ldflags=openmp_flags(),
            extra_include_paths=[str(src)],
            build_directory=str(directory),
            with_cuda=want_cuda(),
            verbose=os.environ.get("FASTADAPTER_VERBOSE_BUILD", "0") == "1",
        )
    if fresh:
        print(f"fastadapter: built {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return module


@functools.cache
def load() -> tuple[Optional[object], Optional[str]]:
    """(module, None) when the extension is usable, else (None, the reason)."""
    try:
        module = importlib.import_module("fastadapter._C")
        return module, None
    except ImportError:
        pass
    src = csrc_dir()
    if src is None:
        return None, "the csrc/ sources are not installed with this package"
    try:
        return build(src), None
    except Exception as exc:  # a missing compiler, a failed build, a torch/CUDA mismatch
        return None, f"the C++ extension could not be built or loaded: {_summary(exc)}"


def _summary(exc: Exception) -> str:
    """The exception's first line and, for a failed build, the first compiler error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    errors = [line for line in lines[1:] if "error" in line.lower()]
    return head + (f" ... {errors[0][:300]}" if errors else "")
