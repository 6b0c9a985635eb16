"""Building, loading and choosing gptcore's CPU decoding kernels (gptcore/inference/gemv.c).

The kernels are C, compiled on first use for the machine they run on (`cc -O3 -march=native`, about a
second) into a cache folder, keyed by the source, the compiler, what it targets and the CPU, and loaded
with ctypes. Inside, one dot-product function per (weight type, instruction set) and a dispatcher: the
library asks the CPU (cpuid) which of the paths it was compiled with can run, and takes the best one
(gemv.c's header lists them); `paths()` says which it took.

Where users are:
- the cache folder is $GPTCORE_CACHE, else $XDG_CACHE_HOME/gptcore, else ~/.cache/gptcore, else (no
  home folder) gptcore-<uid> in the temporary folder;
- OpenMP: the library is linked to the OpenMP runtime torch has already loaded, never to a second one
  (two in one process fight over threads, and LLVM's aborts with "OMP: Error #15"); a compiler without
  OpenMP (Apple's clang), or whose OpenMP cannot use torch's runtime (clang beside GNU libgomp), builds it
  single-threaded, with one warning;
- no C compiler, or a compile error: decoding keeps torch's kernels, with one warning.

Why not torch.utils.cpp_extension: it builds a C++ Python extension against torch's headers (tens of
seconds and a C++ compiler on first use, and ninja for its fast path), for kernels that need none of
torch's API: they read data pointers, and a plain C build takes a second. Its OpenMP handling is the
same -fopenmp of the compiler, with the same second-runtime risk on macOS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fPIC")
OPENMP_FLAG = "-fopenmp"
# Instruction-set levels of gptcore_gemv_select in gemv.c: the best path at or below the level is taken.
ISA_LEVELS = {"scalar": 0, "avx2": 1, "avx-vnni": 2, "avx512": 3}
OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp5")
_chosen: dict[str, str] = {}  # the path of each weight type, as gemv.c's dispatcher last chose it


def cache_dir() -> Path:
    """Where compiled kernels are kept: $GPTCORE_CACHE, $XDG_CACHE_HOME/gptcore, ~/.cache/gptcore, or
    (without a home folder) gptcore-<uid> in the temporary folder."""
    if os.environ.get("GPTCORE_CACHE"):
        return Path(os.environ["GPTCORE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "gptcore"
    try:
        return Path.home() / ".cache" / "gptcore"
    except (RuntimeError, KeyError):  # no HOME and no password entry (containers run as an arbitrary uid)
        return Path(tempfile.gettempdir()) / f"gptcore-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _cpu_identity() -> str:
    """The CPU's model and feature flags: -march=native code is only valid on a CPU that has them."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def compiler() -> list[str]:
    """The C compiler command: $CC (which may carry arguments), else cc."""
    return shlex.split(os.environ.get("CC") or "cc")


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def openmp_runtime() -> Path | None:
    """The OpenMP runtime library torch has loaded into this process (GNU libgomp, LLVM libomp or Intel
    libiomp5), or None: on Linux from /proc/self/maps, elsewhere from torch's own lib folder."""
    try:
        mapped = [line.split(maxsplit=5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()]
    except OSError:
        torch_folder = Path(importlib.util.find_spec("torch").submodule_search_locations[0])
        mapped = [str(p) for p in (torch_folder / "lib").glob("lib*omp*")]
    for name in mapped:
        path = Path(name)
        if path.name.startswith(OPENMP_RUNTIMES) and path.is_file():
            return path
    return None


def _openmp_link(macros: str, runtime: Path | None) -> list[str] | None:
    """The link arguments that make the library use `runtime` (torch's OpenMP), [] to let the compiler
    link its own where torch has none, or None when this compiler's OpenMP cannot use torch's: clang
    emits calls to LLVM's entry points (__kmpc_*), which GNU libgomp lacks; gcc's (GOMP_*) are in all three."""
    if runtime is None:
        return [OPENMP_FLAG]
    if "__clang__" in macros and runtime.name.startswith("libgomp"):
        return None
    return [str(runtime), f"-Wl,-rpath,{runtime.parent}"]


def _target_macros(cc: list[str]) -> tuple[str, bool]:
    """What the compiler targets with FLAGS (its predefined macros: the instruction sets, a wrapper's
    flags included), and whether it takes -fopenmp (Apple's clang refuses it)."""
    try:
        return _run([*cc, *FLAGS, OPENMP_FLAG, "-dM", "-E", "-x", "c", os.devnull]), True
    except subprocess.CalledProcessError:
        return _run([*cc, *FLAGS, "-dM", "-E", "-x", "c", os.devnull]), False


def _build(cc: list[str], library: Path, link: list[str] | None) -> None:
    """Compile gemv.c into `library` (atomically: no half-written library), with OpenMP linked as `link`
    says, or without OpenMP when link is None. Raises CalledProcessError on a compile error."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        obj, built = Path(tmp) / "gemv.o", Path(tmp) / library.name
        openmp = [] if link is None else [OPENMP_FLAG]
        _run([*cc, *FLAGS, *openmp, "-c", "-o", str(obj), str(SOURCE)])
        _run([*cc, "-shared", "-o", str(built), str(obj), *(link or []), "-lm"])
        os.replace(built, library)


@functools.cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use and kept in cache_dir() for later processes, with the best
    path of each weight type chosen; None, with one warning, when they cannot be built (no C compiler, a
    compile error). $CC names the compiler."""
    cc = compiler()
    try:
        version = _run([*cc, "--version"])
        macros, has_openmp = _target_macros(cc)
        runtime = openmp_runtime()
        link = _openmp_link(macros, runtime) if has_openmp else None
        key = "\0".join([SOURCE.read_text(), version, macros, " ".join(FLAGS), str(link), _cpu_identity()])
        library = cache_dir() / f"gemv-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if not library.exists():
            _build(cc, library, link)
        kernels = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else []
        logger.warning(
            f"decoding keeps torch's slower matrix-vector products: cannot build gemv.c with {' '.join(cc)}: "
            f"{' '.join(detail) or exc}"
        )
        return None
    _declare(kernels)
    _select(kernels, "avx512")
    if not kernels.gptcore_gemv_openmp():
        logger.warning(
            f"gemv.c built without OpenMP ({' '.join(cc)} has none that can share torch's "
            f"{runtime.name if runtime else 'runtime'}): the decoding kernels run on one thread"
        )
    logger.debug(f"decoding kernels: {describe(kernels)}")
    return kernels


def _declare(kernels: ctypes.CDLL) -> None:
    """The C functions' argument and return types (gemv.c)."""
    pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    kernels.gptcore_gemv_bf16.argtypes = [pointer] * 4 + [size] * 3 + [integer] * 2
    kernels.gptcore_gemv_bf16.restype = None
    kernels.gptcore_gemv_int8.argtypes = [pointer, integer] + [pointer] * 4 + [size] * 3 + [integer] * 2
    kernels.gptcore_gemv_int8.restype = integer
    kernels.gptcore_block_decode.argtypes = (
        [pointer, integer] + [pointer] * 4 + [size] * 5 + [pointer, ctypes.c_float, integer]
    )
    kernels.gptcore_block_decode.restype = integer
    kernels.gptcore_gemv_f32.argtypes = [pointer] * 4 + [size] * 3 + [integer]
    kernels.gptcore_gemv_f32.restype = None
    kernels.gptcore_gemv_select.argtypes = [integer]
    kernels.gptcore_gemv_path.argtypes = [integer]
    kernels.gptcore_gemv_path.restype = ctypes.c_char_p


def _select(kernels: ctypes.CDLL, level: str) -> None:
    kernels.gptcore_gemv_select(ISA_LEVELS[level])
    _chosen.update(
        bf16=kernels.gptcore_gemv_path(0).decode(),
        int8=kernels.gptcore_gemv_path(1).decode(),
        f32=kernels.gptcore_gemv_path(2).decode(),
    )


def paths() -> dict[str, str] | None:
    """The path each weight type's products take ({"bf16": "avx2-fma", "int8": "avx-vnni", "f32": "avx2-fma"},
    say: gemv.c's header names them), or None without kernels. fp32 products (batch-invariant decoding in
    fp32) take the kernels on every path, the portable one included."""
    return None if load_kernels() is None else dict(_chosen)


def fast_bf16() -> bool:
    """True when the kernels multiply bf16 weights with vector instructions (natively or widened to fp32
    in registers): then 16-bit weights decode faster than fp32 ones, which read twice the bytes."""
    return load_kernels() is not None and _chosen["bf16"] != "scalar"


def fast_int8() -> bool:
    """True when the kernels multiply int8 weights with vector instructions. Elsewhere int8 products take
    torch's kernel (_weight_int8pack_mm), which the portable C loop does not match: it read about half
    of torch's bytes per second over GPT-2 large's shapes (one thread, alternating in one process)."""
    return load_kernels() is not None and _chosen["int8"] != "scalar"


def select(level: str) -> dict[str, str]:
    """Limit the kernels to the paths at or below an instruction-set level of ISA_LEVELS ("avx512" lifts
    the limit), for tests and benchmarks; not while a product runs. Returns paths().

    Raises:
        RuntimeError: no kernels.
    """
    kernels = load_kernels()
    if kernels is None:
        raise RuntimeError("kernels: not available")
    _select(kernels, level)
    return paths()


def describe(kernels: ctypes.CDLL | None = None) -> str:
    """One line on the kernels in use: each weight type's path, and threads."""
    kernels = kernels or load_kernels()
    if kernels is None:
        return "none (torch's kernels)"
    threads = "OpenMP" if kernels.gptcore_gemv_openmp() else "one thread"
    bf16, int8, f32 = (kernels.gptcore_gemv_path(i).decode() for i in (0, 1, 2))
    int8 = int8 if int8 != "scalar" else "torch's _weight_int8pack_mm (no vector int8 path)"
    return f"gemv.c, bf16 weights {bf16}, int8 weights {int8}, fp32 weights {f32}, {threads}"
