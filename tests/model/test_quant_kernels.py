"""The native quantized matmuls (csrc/quant_matmul.cpp) against gguf's own dequantize and a
float64 matmul, on random blocks of every native type (no model)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kvserve.model import cpu_kernels
from kvserve.model.gguf_blocks import NATIVE_TYPES, QuantTensor, row_bytes
from kvserve.model.quant import QuantLinear, native_types, quant_kernel

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# Byte offsets of the float16 scale fields in each block; every other byte is random.
SCALE_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q8_0: [0], Q.Q4_K: [0, 2],
                Q.Q6_K: [208]}  # fmt: skip
BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q8_0: 34, Q.Q4_K: 144, Q.Q6_K: 210}
TYPES = sorted(NATIVE_TYPES, key=int)


def random_weight(qtype: Q, rows: int, cols: int, seed: int = 0) -> QuantTensor:
    """Random bytes, with finite scales of either sign: every bit pattern of the quants."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, row_bytes(qtype, cols)), dtype=np.uint8)
    blocks = data.reshape(rows, -1, BLOCK_BYTES[qtype])  # (rows, blocks, bytes)
    for offset in SCALE_FIELDS[qtype]:
        scales = rng.uniform(0.002, 0.05, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])
        blocks[:, :, offset : offset + 2] = scales.astype(np.float16)[..., None].view(np.uint8)
    return QuantTensor(qtype, data, cols)


def reference(weight: QuantTensor, x: torch.Tensor) -> np.ndarray:
    w = dequantize(weight.data, weight.qtype).astype(np.float64)  # [rows, cols]
    return x.double().numpy() @ w.T


def tolerance(weight: QuantTensor, x: torch.Tensor) -> np.ndarray:
    """The activation rounding bound, plus float32 rounding.

    Each row of x is quantized per block of 32 to d * q, q = round(x / d), d = max|x| / 32767,
    so each value moves by at most d / 2: the result by at most sum over blocks of
    d / 2 * sum|w|. Float32 rounding: the products and sums, relative 1e-5 of their magnitude.
    """
    w = np.abs(dequantize(weight.data, weight.qtype).astype(np.float64))
    ax = np.abs(x.double().numpy())
    half_step = ax.reshape(len(ax), -1, 32).max(-1) / 32767 / 2 * 1.001  # [M, blocks]
    w_sums = w.reshape(len(w), -1, 32).sum(-1)  # [N, blocks]
    return half_step @ w_sums.T + 1e-5 * (ax @ (w + w.max()).T)


def shapes_for(qtype: Q) -> list[int]:
    """Columns: an odd number of blocks of 32 (a lone last block), or super-blocks of 256."""
    return [768] if qtype in (Q.Q4_K, Q.Q6_K) else [32 * 19, 64]


@pytest.fixture(scope="module")
def kernel():
    k = quant_kernel()
    assert k is not None, "g++ is installed on an AVX2 machine, so the kernel must build"
    return k


@needs_compiler
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("num_rows", [1, 5, 70])
def test_matches_dequantized_float64_matmul(kernel, qtype, num_rows):
    for cols in shapes_for(qtype):
        weight = random_weight(qtype, 37, cols, seed=cols)  # 37: not a multiple of any tile
        x = torch.randn(num_rows, cols, generator=torch.Generator().manual_seed(num_rows))
        got = QuantLinear([weight], kernel)(x).double().numpy()
        assert got.shape == (num_rows, 37)
        excess = np.abs(got - reference(weight, x)) / tolerance(weight, x)
        assert (excess <= 1).all(), f"error up to {excess.max():.2f}x the bound"  # measured: 0.06x


@needs_compiler
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_exact_on_activations_that_quantize_exactly(kernel, qtype):
    """Integers with a 32767 in each block are their own 16-bit quantization: only float32
    rounding remains, so a wrong bit anywhere in the unpacking shows."""
    cols = shapes_for(qtype)[0]
    weight = random_weight(qtype, 70, cols, seed=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-32767, 32768, (3, cols), generator=g).float()
    x.view(3, -1, 32)[:, :, 7] = 32767.0
    got = QuantLinear([weight], kernel)(x).double().numpy()
    w = np.abs(dequantize(weight.data, weight.qtype).astype(np.float64))
    slack = 1e-5 * (np.abs(x.double().numpy()) @ (w + w.max()).T)
    assert (np.abs(got - reference(weight, x)) <= slack).all()


@needs_compiler
def test_rows_do_not_depend_on_the_batch_or_the_threads(kernel):
    """Bit for bit: a row alone, in batches of every size and split, on 1 or 2 threads."""
    weight = [random_weight(Q.Q4_K, 70, 512, 1), random_weight(Q.Q6_K, 33, 512, 2)]
    linear = QuantLinear(weight, kernel)  # a fused projection whose parts differ in type
    x = torch.randn(67, 512, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = linear(x)
        torch.set_num_threads(1)
        assert torch.equal(linear(x), batched)
        for start, stop in [(0, 1), (5, 6), (66, 67), (3, 10), (0, 64), (10, 67)]:
            assert torch.equal(linear(x[start:stop]), batched[start:stop])
        torch.set_num_threads(2)
        for i in (0, 17, 66):
            assert torch.equal(linear(x[i : i + 1]), batched[i : i + 1])
    finally:
        torch.set_num_threads(threads)


@needs_compiler
def test_stacked_parts_equal_their_separate_matmuls(kernel):
    parts = [random_weight(qt, n, 256, seed) for seed, (qt, n) in
             enumerate([(Q.Q4_1, 33), (Q.Q8_0, 40), (Q.Q4_K, 7)])]
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(4))
    fused = QuantLinear(parts, kernel)(x)
    assert torch.equal(fused, torch.cat([QuantLinear([p], kernel)(x) for p in parts], dim=1))


@needs_compiler
def test_bfloat16_in_and_out(kernel):
    """bfloat16 activations convert exactly; the float32 result is rounded once."""
    linear = QuantLinear([random_weight(Q.Q4_1, 40, 96)], kernel)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = linear(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, linear(x.float()).bfloat16())


@needs_compiler
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantized_rows_equal_gguf(kernel, qtype):
    cols = shapes_for(qtype)[0]
    weight = random_weight(qtype, 20, cols, seed=6)
    ids = torch.tensor([19, 0, 7, 7])
    expected = dequantize(weight.data, qtype)[ids.numpy()]
    assert np.array_equal(kernel.dequantize_rows(weight, ids).numpy(), expected)


@needs_compiler
def test_unsupported_types_are_refused(kernel):
    weight = QuantTensor(Q.Q5_K, np.zeros((4, 176), dtype=np.uint8), 256)
    with pytest.raises(ValueError, match="no native kernel"):
        QuantLinear([weight], kernel)


def test_switched_off_or_without_compiler_dequantizes(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    cpu_kernels.load_quant_library.cache_clear()
    try:
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
        assert quant_kernel() is None and native_types() == frozenset()
        cpu_kernels.load_quant_library.cache_clear()
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "1")
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        with caplog.at_level(logging.WARNING, logger="kvserve"):
            assert native_types() == frozenset()
        assert "no C++ compiler" in caplog.text and "dequantized" in caplog.text
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_kernels.load_quant_library.cache_clear()
