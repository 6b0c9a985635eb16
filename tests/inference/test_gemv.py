"""The decoding kernels (gptcore/inference/gemv.py, gemv.c): their arithmetic on every instruction-set path,
determinism, the build cache, and a machine without a C compiler (the builds: tests/inference/test_kernels.py)."""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptcore.config import GPTConfig
from gptcore.inference import decode_block, gemv, kernels
from gptcore.inference.decoding import cast_for_inference, generate
from gptcore.model import KVCache, random_model

needs_kernels = pytest.mark.skipif(kernels.load_kernels() is None, reason="no C compiler")
SHAPES = [(1, 5120, 1280), (3, 1283, 77), (8, 64, 320), (2, 5, 1), (1, 4, 33)]  # (rows, out, in): tails too


def _bf16_ulps(x: torch.Tensor) -> torch.Tensor:
    """One bf16 step at each value's magnitude (2^-7 relative)."""
    return x.abs().clamp(min=1e-30) * 2.0**-7


def q8_0_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gemv_int8's arithmetic in plain torch (fp64): x quantized to int8 per block of 32 as llama.cpp's
    q8_0 (scale = max|x| / 127, round half away from zero), exact integer dot products per block."""
    rows, k = x.shape
    pad = -k % 32
    xp = F.pad(x.double(), (0, pad)).view(rows, -1, 32)
    block_scale = xp.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(block_scale > 0, xp / torch.where(block_scale > 0, block_scale, 1), 0)
    xq = torch.sign(xq) * torch.floor(xq.abs() + 0.5)
    qp = F.pad(q.double(), (0, pad)).view(q.shape[0], -1, 32)
    dots = torch.einsum("rbk,nbk->rnb", xq, qp)  # [rows, out, blocks], integers
    y = (dots * block_scale.squeeze(-1)[:, None, :]).sum(-1) * scales.double()
    return y if bias is None else y + bias.double()


@pytest.fixture(params=list(kernels.ISA_LEVELS))
def isa(request):
    """Each instruction-set level in turn (the best path at or below it that this CPU and build have:
    every path is held to the same exact references); the best again afterwards."""
    if kernels.load_kernels() is None:
        pytest.skip("no C compiler")
    yield kernels.select(request.param)
    kernels.select("avx512")


@pytest.mark.parametrize("rows, n, k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_gemv_is_linear_rounded_once(rows, n, k, with_bias, isa):
    torch.manual_seed(0)
    x, w = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    out = gemv.gemv_bf16(x, w, bias)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    # fp32 sums in another order than fp64's, then one rounding to bf16: within one bf16 step (plus the
    # fp32 sum's own error, k * 2^-24 of the sum of |products|).
    slack = _bf16_ulps(exact) + k * 2.0**-23 * (x.double().abs() @ w.double().abs().t())
    assert ((out.double() - exact).abs() <= slack).all()
    torch_out = F.linear(x, w, bias)  # torch's bf16 kernel agrees as closely
    assert ((out.double() - torch_out.double()).abs() <= 2 * slack).all()


@pytest.mark.parametrize("rows, n, k", SHAPES)
def test_int8_gemv_is_the_q8_0_dot_product(rows, n, k, isa):
    torch.manual_seed(1)
    x = torch.randn(rows, k) * torch.linspace(0.1, 30, k)  # blocks of very different magnitudes
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)  # -128 too: the AVX2 paths take |q| unsigned
    scales, bias = (torch.rand(n) / 50).bfloat16(), torch.randn(n).bfloat16()
    exact = q8_0_reference(x, q, scales, bias)
    out = gemv.gemv_int8(x, q, scales, bias)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    magnitude = (x.double().abs() @ q.double().abs().t()) * scales.double()
    assert ((out.double() - exact).abs() <= _bf16_ulps(exact) + 1e-5 * magnitude + 1e-6).all()
    # ... and close to the unquantized product: the activations' rounding costs < 1% of the magnitude.
    unquantized = x.double() @ (q.double() * scales.double()[:, None]).t() + bias.double()
    assert ((out.double() - unquantized).abs() <= 0.01 * magnitude + _bf16_ulps(unquantized)).all()


@needs_kernels
@pytest.mark.parametrize("rows, n, k", SHAPES)
def test_fp32_gemv_is_linear_and_batch_invariant(rows, n, k, isa):
    """Each path's fp32 sums are within fp32 rounding of fp64's, and a row's outputs are the same bytes
    alone as beside the other rows (batch-invariant decoding in fp32)."""
    torch.manual_seed(2)
    x, w, bias = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    out = gemv.gemv_f32(x, w, bias)
    exact = F.linear(x.double(), w.double(), bias.double())
    assert out.shape == (rows, n) and out.dtype == torch.float32
    slack = (k + 1) * 2.0**-23 * (x.double().abs() @ w.double().abs().t() + bias.double().abs())
    assert ((out.double() - exact).abs() <= slack).all()
    for r in range(rows):
        assert torch.equal(gemv.gemv_f32(x[r : r + 1], w, bias), out[r : r + 1])


def test_a_nan_activation_stays_nan_in_int8():
    """A block holding NaN (or an infinity) is not quantized to zeros, which would hide a blow-up."""
    q = torch.ones(3, 96, dtype=torch.int8)
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 96)
        x[0, 40] = bad
        out = gemv.gemv_int8(x, q, torch.ones(3).bfloat16(), out_dtype=torch.float32)
        assert out[0].isnan().all() and torch.equal(out[1], torch.full((3,), 96.0))


@needs_kernels
def test_an_all_zero_block_and_row_give_exact_zeros():
    x = torch.zeros(1, 96)
    x[0, 40] = 3.0  # blocks 0 and 2 all zero
    q = torch.ones(2, 96, dtype=torch.int8)
    q[1] = 0
    out = gemv.gemv_int8(x, q, torch.ones(2).bfloat16())
    assert out.tolist() == [[3.0, 0.0]]


@needs_kernels
def test_same_bytes_whatever_the_thread_count():
    torch.manual_seed(2)
    x, w, b = torch.randn(4, 1280).bfloat16(), torch.randn(3843, 1280).bfloat16(), torch.randn(3843).bfloat16()
    q = torch.randint(-127, 128, (3843, 1280), dtype=torch.int8)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append((gemv.gemv_bf16(x, w, b), gemv.gemv_int8(x, q, b, b)))
    finally:
        torch.set_num_threads(threads)
    for bf16, int8 in outs[1:]:
        assert torch.equal(bf16, outs[0][0]) and torch.equal(int8, outs[0][1])


def test_bad_shapes_and_devices_are_refused():
    if kernels.load_kernels() is None:
        pytest.skip("no C compiler")
    with pytest.raises(ValueError, match="does not match"):
        gemv.gemv_bf16(torch.zeros(1, 8).bfloat16(), torch.zeros(4, 9).bfloat16())
    with pytest.raises(ValueError, match="does not match"):
        gemv.gemv_bf16(torch.zeros(1, 8).bfloat16(), torch.zeros(8, 4).bfloat16().t())  # not contiguous
    with pytest.raises(ValueError, match="bias must be"):
        gemv.gemv_int8(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3).bfloat16())
    with pytest.raises(ValueError, match="does not match"):
        gemv.gemv_int8(torch.zeros(1, 8), torch.zeros(4, 8), torch.zeros(4).bfloat16())  # fp32 weight
    with pytest.raises(ValueError, match="does not match"):
        gemv.gemv_f32(torch.zeros(1, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="does not match"):
        gemv.gemv_f32(torch.zeros(1, 8), torch.zeros(8, 4).t())  # not contiguous
    with pytest.raises(ValueError, match="bias must be contiguous fp32"):
        gemv.gemv_f32(torch.zeros(1, 8), torch.zeros(4, 8), torch.zeros(4).bfloat16())


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """load_kernels() building into an empty cache under tmp_path; restored afterwards."""
    monkeypatch.setenv("GPTCORE_CACHE", str(tmp_path / "gptcore"))
    kernels.load_kernels.cache_clear()
    yield tmp_path
    kernels.load_kernels.cache_clear()


@needs_kernels
def test_the_library_is_built_once_and_kept(fresh_kernels):
    kernels.load_kernels()
    built = list((fresh_kernels / "gptcore").glob("gemv-*.so"))  # in $GPTCORE_CACHE
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels.load_kernels.cache_clear()
    assert kernels.load_kernels() is not None and built[0].stat().st_mtime_ns == stamp
    assert list((fresh_kernels / "gptcore").iterdir()) == built  # no temporary left behind


def test_without_a_compiler_decoding_keeps_torchs_kernels(fresh_kernels, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_kernels / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="gptcore"):
        assert kernels.load_kernels() is None
    assert "keeps torch's slower matrix-vector products" in caplog.text
    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for quantize in ("none", "int8"):
            model = cast_for_inference(random_model(config, seed=0).eval(), "bf16-true", quantize)
            assert not any(isinstance(m, gemv.GemvLinear) for m in model.modules())
            assert generate(model, torch.tensor([[1, 2, 3]]), 4).shape == (1, 7)


@needs_kernels
def test_bf16_decoding_runs_through_the_kernel_and_agrees_with_torch(monkeypatch):
    if not kernels.fast_bf16():
        pytest.skip("the CPU has no AVX512-BF16: bf16 decoding keeps torch's kernels")
    config = GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2)
    model = cast_for_inference(random_model(config, seed=4).eval(), "bf16-true")
    assert sum(isinstance(m, gemv.GemvLinear) for m in model.modules()) == 4 * config.n_layers + 1  # and the head
    assert model.out_head.weight.dtype == torch.bfloat16 and model.out_head.out_dtype == torch.float32
    tokens = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    calls = []
    kernel = gemv._product_bf16  # what both gemv_bf16 and the layers' per-token path call
    monkeypatch.setattr(gemv, "_product_bf16", lambda *a: calls.append(1) or kernel(*a))
    # Each Linear's own per-token path (which padded batches take); the one-call block step is
    # tests/inference/test_decode_block.py's.
    monkeypatch.setattr(decode_block, "decode_step", lambda *a: None)
    cache = KVCache(config, 1, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        model(tokens[:, :9], cache)  # the prompt: torch's kernels
        assert not calls
        steps = torch.cat([model(tokens[:, i : i + 1], cache) for i in range(9, 16)], 1)  # one token each
        assert len(calls) == (4 * config.n_layers + 1) * 7 and steps.dtype == torch.float32
        monkeypatch.setitem(gemv.MAX_ROWS, torch.bfloat16, 0)  # everything through torch's kernels
        reference = model(tokens)[:, 9:]
    assert (steps - reference).abs().max().item() < 0.05 * reference.abs().max().item()


def test_layer_product_takes_only_what_was_checked():
    """The per-token path skips the public checks, so it must decline whatever they would refuse."""
    if kernels.load_kernels() is None:
        pytest.skip("no C compiler")
    from gptcore.inference.quantize import Int8Linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 24).to(torch.bfloat16)
    layer = gemv.GemvLinear.from_linear(linear)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert gemv.layer_product(layer, x) is not None
        assert gemv.layer_product(layer, x.float()) is None  # another dtype than the weight's
        assert gemv.layer_product(layer, torch.randn(1, 64, 2, dtype=torch.bfloat16)[..., 0]) is None  # strided
        assert gemv.layer_product(layer, torch.randn(1, 65, 64, dtype=torch.bfloat16)) is None  # a long prompt
        # a decoding step of many rows (one position each) takes the kernel: batch-invariant
        assert gemv.layer_product(layer, torch.randn(65, 1, 64, dtype=torch.bfloat16)) is not None
    assert gemv.layer_product(layer, x) is None  # autograd on
    int8 = Int8Linear(nn.Linear(64, 24))
    with torch.no_grad():
        expected = int8(x)
        int8.to(torch.float32)  # floating buffers (scales, bias) become fp32; the kernel reads bf16
        assert gemv.layer_product(int8, x) is None
        torch.testing.assert_close(int8(x), expected, rtol=0.02, atol=0.02)  # torch's path instead
    f32 = gemv.GemvLinear.from_linear(nn.Linear(64, 24), torch.float32)
    with torch.no_grad():
        assert gemv.layer_product(f32, torch.randn(9, 1, 64)) is not None  # a decoding step of 9 rows
        assert gemv.layer_product(f32, torch.randn(1, 9, 64)) is None  # a prompt: MAX_ROWS[fp32] is 0
        assert gemv.layer_product(f32, x) is None  # a bf16 x
        f32.bias.data = f32.bias.data.bfloat16()  # the fp32 kernel reads an fp32 bias
        assert gemv.layer_product(f32, torch.randn(1, 1, 64)) is None
