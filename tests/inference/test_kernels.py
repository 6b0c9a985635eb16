"""Building and choosing the decoding kernels (gptcore/inference/kernels.py, gemv.c): a path is taken only where
the CPU has its instructions, a build without AVX512 (a compiler wrapper, as for an AVX2-only CPU) decodes
as the AVX512 one does, the cache folder, a compiler that fails or has no OpenMP, one OpenMP runtime in the
process, `auto` for decoding, and a wrong input width on every public layer (a Python error, never a signal)."""

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference import kernels
from gptcore.inference.decoding import cast_for_inference, generate, resolve_decoding_precision
from gptcore.model import KVCache, random_model
from gptcore.weights import save_model

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_kernels = pytest.mark.skipif(kernels.load_kernels() is None, reason="no C compiler")
REPO = Path(__file__).resolve().parents[2]
# The wrappers `gptcore bench` runs are measured with (docs/performance.md): cc without AVX512 (issue 32's
# flags), and without AVX-VNNI either (an AVX2-only CPU such as AMD Zen 3).
WRAPPERS = {"no-avx512": REPO / "benchmarks" / "cc-no-avx512", "avx2-only": REPO / "benchmarks" / "cc-avx2-only"}
# The /proc/cpuinfo flags each path needs.
NEEDS = {
    "avx512-bf16": {"avx512_bf16", "avx512bw"},
    "avx512-vnni": {"avx512_vnni", "avx512bw"},
    "avx-vnni": {"avx_vnni", "avx2", "fma"},
    "avx2-fma": {"avx2", "fma"},
    "avx2": {"avx2", "fma"},
    "scalar": set(),
}
CONFIG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def _refusing(folder: Path, option: str) -> str:
    """A compiler command: cc, refusing `option` as Apple's clang refuses -fopenmp."""
    script = folder / "cc-refusing"
    script.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{option}" ] && '
        f'{{ echo "cc: error: unsupported option {option}" >&2; exit 1; }}; done\nexec cc "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def build(tmp_path, monkeypatch):
    """A function building the kernels afresh with the compiler command given, into an empty cache."""

    def rebuild(cc: str | None = None):
        if cc is not None:
            monkeypatch.setenv("CC", cc)
        kernels.load_kernels.cache_clear()
        return kernels.load_kernels()

    monkeypatch.setenv("GPTCORE_CACHE", str(tmp_path / "cache"))
    yield rebuild
    monkeypatch.delenv("CC", raising=False)
    kernels.load_kernels.cache_clear()


@needs_kernels
def test_a_path_is_taken_only_where_the_cpu_has_its_instructions():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    try:
        for level in kernels.ISA_LEVELS:
            chosen = kernels.select(level)
            for path in chosen.values():
                assert NEEDS[path] <= flags, f"{path} taken without {NEEDS[path] - flags}"
            if level == "scalar":
                assert chosen == {"bf16": "scalar", "int8": "scalar", "f32": "scalar"}
    finally:
        kernels.select("avx512")
    if X86 and {"avx2", "fma"} <= flags:  # on x86-64 with AVX2 no product runs the scalar loop
        assert "scalar" not in kernels.paths().values()


def _decode(model, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [B, steps, vocab] of one token at a time after a prompt (the one-call block step)."""
    cache = KVCache(model.config, tokens.shape[0], tokens.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        model(tokens[:, :prompt], cache)
        return torch.cat([model(tokens[:, i : i + 1], cache) for i in range(prompt, tokens.shape[1])], 1)


def _outputs(models: dict[str, torch.nn.Module]) -> dict[str, tuple[torch.Tensor, list]]:
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(11))
    return {name: (_decode(m, tokens, 8), generate(m, tokens[:1, :8], 16).tolist()) for name, m in models.items()}


@needs_kernels
@pytest.mark.skipif(not X86, reason="the wrapper's flags are x86-64 flags")
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_build_without_avx512_decodes_as_the_avx512_one(build, tmp_path, wrapper):
    """Built as for a CPU without AVX512 (and, second, without AVX-VNNI either: AMD Zen 2/3), the library
    takes no AVX512 path at run time, and a bf16 and an int8 model give the same greedy tokens as with
    the kernels of the full build, logits within the tolerance of tests/inference/test_decode_block.py."""
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        pytest.skip("the CPU has no AVX2 + FMA")
    models = {q: cast_for_inference(random_model(CONFIG, seed=7).eval(), "bf16-true", q) for q in ("none", "int8")}
    assert build() is not None
    reference = _outputs(models)
    assert build(str(WRAPPERS[wrapper])) is not None
    assert len(list((tmp_path / "cache").glob("gemv-*.so"))) == 2  # the wrapper's flags are in the cache key
    chosen = kernels.paths()
    assert chosen["bf16"] == "avx2-fma"
    assert chosen["f32"] == "avx2-fma"
    assert chosen["int8"] == ("avx-vnni" if wrapper == "no-avx512" and "avx_vnni" in flags else "avx2")
    for name, (logits, tokens) in _outputs(models).items():
        expected_logits, expected_tokens = reference[name]
        assert tokens == expected_tokens, name
        scale = expected_logits.abs().max().item()
        assert (logits - expected_logits).abs().max().item() < 0.05 * scale, name


def test_the_cache_folder(monkeypatch, tmp_path):
    """$GPTCORE_CACHE first; without it and without a home folder, a folder in the temporary one."""
    monkeypatch.setenv("GPTCORE_CACHE", str(tmp_path / "mine"))
    assert kernels.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GPTCORE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    folder = kernels.cache_dir()
    assert folder.parent == Path(__import__("tempfile").gettempdir()) and folder.name.startswith("gptcore-")


@needs_kernels
def test_a_compiler_without_openmp_builds_one_thread_with_one_warning(build, tmp_path, caplog):
    torch.manual_seed(0)
    x, w = torch.randn(2, 300).bfloat16(), torch.randn(70, 300).bfloat16()
    q = torch.randint(-127, 128, (70, 300), dtype=torch.int8)
    from gptcore.inference import gemv

    expected = gemv.gemv_bf16(x, w), gemv.gemv_int8(x, q, w[:, 0].contiguous())
    with caplog.at_level(logging.WARNING, logger="gptcore"):
        library = build(_refusing(tmp_path, "-fopenmp"))
    assert library is not None and not library.gptcore_gemv_openmp()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        next(r.getMessage() for r in caplog.records if "without OpenMP" in r.getMessage())
    ]
    got = gemv.gemv_bf16(x, w), gemv.gemv_int8(x, q, w[:, 0].contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # the same sums, in the same order


@needs_kernels
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
def test_one_openmp_runtime_in_the_process(tmp_path):
    """torch and the kernels share one OpenMP runtime. Checked in a fresh process: the suite's own process
    has loaded other libraries' runtimes by then (scikit-learn's wheels bring their own libgomp)."""
    code = """
from pathlib import Path
import torch
from gptcore.inference import kernels
assert kernels.load_kernels().gptcore_gemv_openmp()
mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
runtimes = {Path(p).resolve() for p in mapped if Path(p).name.startswith(kernels.OPENMP_RUNTIMES)}
assert len(runtimes) == 1, runtimes  # torch's, which the library shares
"""
    env = {**os.environ, "GPTCORE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_openmp_is_linked_to_torchs_runtime_or_left_out(tmp_path):
    gomp, llvm = tmp_path / "libgomp-1234.so.1", tmp_path / "libomp.dylib"
    assert kernels._openmp_link("#define __GNUC__ 12", gomp) == [str(gomp), f"-Wl,-rpath,{tmp_path}"]
    assert kernels._openmp_link("#define __clang__ 1", llvm) == [str(llvm), f"-Wl,-rpath,{tmp_path}"]
    assert kernels._openmp_link("#define __clang__ 1", gomp) is None  # clang's calls are not in libgomp
    assert kernels._openmp_link("#define __GNUC__ 12", None) == ["-fopenmp"]  # torch has none: the compiler's


def test_auto_decodes_in_16_bits_where_a_vector_kernel_exists(monkeypatch):
    import gptcore.precision as precision_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    for found, expected in (
        ({"bf16": "avx2-fma", "int8": "avx2"}, "bf16-true"),
        ({"bf16": "scalar", "int8": "scalar"}, "fp32"),
        (None, "fp32"),
    ):
        monkeypatch.setattr(kernels, "paths", lambda found=found: found)
        precision, reason = resolve_decoding_precision("auto", cpu)
        assert precision == expected and reason.startswith("auto: ")
        assert ("avx2-fma" in reason) == (expected == "bf16-true")
    assert resolve_decoding_precision("fp32", cpu) == ("fp32", "set explicitly")
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_decoding_precision("auto", cpu)[0] == "bf16-true"


WRONG_WIDTHS = """
import torch
from torch import nn
from gptcore.config import GPTConfig
from gptcore.inference import gemv, kernels
from gptcore.inference.decoding import cast_for_inference
from gptcore.inference.quantize import Int8Linear
from gptcore.model import KVCache, random_model

assert kernels.load_kernels() is not None
config = GPTConfig(vocab_size=50257, context_length=16, emb_dim=64, n_heads=4, n_layers=1)
layers = {
    "GemvLinear": gemv.GemvLinear.from_linear(nn.Linear(64, 48).to(torch.bfloat16)),
    "GemvLinear head": gemv.GemvLinear.from_linear(nn.Linear(64, 48).to(torch.bfloat16), torch.float32),
    "Int8Linear": Int8Linear(nn.Linear(64, 48)),
    "Int8Linear head": Int8Linear(nn.Linear(64, 48), out_dtype=torch.float32),
    "gemv_bf16": lambda x: gemv.gemv_bf16(x, torch.randn(48, 64).bfloat16()),
    "gemv_int8": lambda x: gemv.gemv_int8(x, torch.ones(48, 64, dtype=torch.int8), torch.ones(48).bfloat16()),
}
for quantize in ("none", "int8"):
    model = cast_for_inference(random_model(config, seed=0).eval(), "bf16-true", quantize)
    cache = KVCache(config, 1, 8, dtype=torch.bfloat16)
    layers[f"DecodeBlock {quantize}"] = lambda x, m=model, c=cache: m.trf_blocks[0](x[None], c)
    layers[f"head {quantize}"] = model.out_head
with torch.no_grad():
    for name, layer in layers.items():
        for width in (8, 63, 65, 640):
            for dtype in (torch.bfloat16, torch.float32):
                for rows in (1, 3, 100):
                    try:
                        layer(torch.randn(rows, width).to(dtype))
                    except (ValueError, RuntimeError):
                        continue
                    raise SystemExit(f"no error: {name}, width {width}, {dtype}, {rows} rows")
print("ok")
"""


@needs_kernels
def test_a_wrong_width_is_a_python_error_on_every_layer():
    """In a child process: a read past an input's end would be a signal (exit -11), not an exception."""
    proc = subprocess.run([sys.executable, "-c", WRONG_WIDTHS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "tiny.safetensors"
    save_model(random_model(GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2)), path)
    return path


@pytest.mark.parametrize("compiler", ["cc", "failing"])
def test_decoding_works_without_home_with_at_most_one_warning(weights, tmp_path, compiler):
    """`gptcore generate` with HOME unset, GPTCORE_CACHE set, and a compiler that works or fails."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "CC")}
    env["GPTCORE_CACHE"] = str(tmp_path / "cache")
    if compiler == "failing":
        script = tmp_path / "failing-cc"
        script.write_text('#!/bin/sh\necho "cc: internal compiler error" >&2\nexit 1\n')
        script.chmod(0o755)
        env["CC"] = str(script)
    proc = subprocess.run(
        [sys.executable, "-m", "gptcore", "generate", "--model", str(weights), "--prompt", "Every effort"]
        + ["--max-new-tokens", "4", "--quantize", "int8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("Every effort"), proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == (1 if compiler == "failing" else 0), proc.stderr
    built = list((tmp_path / "cache").glob("gemv-*.so"))
    assert len(built) == (0 if compiler == "failing" else 1)


@needs_kernels
def test_without_a_vector_int8_path_int8_takes_torchs_kernel(monkeypatch):
    """The portable int8 loop is slower than torch's _weight_int8pack_mm: where it is all there is, the
    layers and the block step leave int8 to torch."""
    from gptcore.inference import decode_block, gemv

    model = cast_for_inference(random_model(CONFIG, seed=7).eval(), "bf16-true", "int8")
    calls = []
    product = gemv._product_int8
    monkeypatch.setattr(gemv, "_product_int8", lambda *a: calls.append(1) or product(*a))
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    try:
        assert kernels.select("scalar")["int8"] == "scalar" and not kernels.fast_int8()
        cache = KVCache(CONFIG, 1, 8, dtype=torch.bfloat16)
        with torch.no_grad():
            assert decode_block.decode_step(model.trf_blocks[0], torch.randn(1, 1, 64).bfloat16(), cache) is None
        assert generate(model, prompt, 6).shape == (1, 11) and not calls
    finally:
        kernels.select("avx512")
    assert generate(model, prompt, 6).shape == (1, 11) and calls  # the head's product at least
