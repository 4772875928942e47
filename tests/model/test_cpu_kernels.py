"""The C++ paged decode kernel against the PyTorch path of paged_attention (no model)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from kvserve.model import cpu_kernels
from kvserve.model.attention import AttentionMetadata, paged_attention

BLOCK = 16

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels.paged_decode_kernel(num_threads=2)
    assert k is not None, "g++ is installed, so the kernel must build"
    return k


def make_case(dtype, num_heads, num_kv_heads, head_dim, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    cache_shape = (num_blocks * BLOCK, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(dtype)
    # Every sequence gets its own blocks, scattered over the pool.
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max((n + BLOCK - 1) // BLOCK for n in lens)
    tables = []
    for n in lens:
        need = (n + BLOCK - 1) // BLOCK
        table, order = order[:need], order[need:]
        tables.append(table + [0] * (width - need))
    tables = torch.tensor(tables, dtype=torch.long)
    # q as the model makes it: a view into [T, q heads + kv heads, head_dim] (rows not packed).
    qk = torch.randn(len(lens), num_heads + num_kv_heads, head_dim, generator=g).to(dtype)
    q = qk[:, :num_heads]
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.long)


def torch_reference(q, k_cache, v_cache, tables, lens, scale):
    """paged_attention's PyTorch path (padded SDPA with a mask), decodes only, nothing written:
    the new token's K/V is already in the cache, so the written slots are copied from it."""
    num_seqs, device = q.shape[0], q.device
    last = lens - 1
    slots = tables[torch.arange(num_seqs, device=device), last // BLOCK] * BLOCK + last % BLOCK
    mask = torch.arange(int(lens.max()), device=device) < lens[:, None]
    meta = AttentionMetadata(slot_mapping=slots, block_size=BLOCK, num_decodes=num_seqs,
                             decode_blocks=tables, decode_len=int(lens.max()),
                             decode_mask=mask[:, None, None, :])
    return paged_attention(q, k_cache[slots].clone(), v_cache[slots].clone(), k_cache, v_cache,
                           meta, scale)


@needs_compiler
@pytest.mark.parametrize(
    "dtype,num_heads,num_kv_heads,head_dim,tol",
    [(torch.float32, 9, 3, 64, 1e-5), (torch.float32, 4, 4, 128, 1e-5),
     (torch.bfloat16, 9, 3, 64, 2e-2), (torch.float32, 8, 1, 64, 1e-5)],
)
def test_kernel_matches_torch_path(kernel, dtype, num_heads, num_kv_heads, head_dim, tol):
    lens = [1, 5, 16, 17, 40, 100, 33]
    q, kc, vc, tables, lens_t = make_case(dtype, num_heads, num_kv_heads, head_dim, lens)
    scale = head_dim**-0.5
    expected = torch_reference(q, kc, vc, tables, lens_t, scale)
    got = kernel(q, kc, vc, tables, lens_t, BLOCK, scale)
    assert got.dtype == dtype and got.shape == (len(lens), num_heads, head_dim)
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@needs_compiler
def test_kernel_result_does_not_depend_on_batch_or_threads(kernel):
    lens = [7, 70, 31, 128, 2]
    q, kc, vc, tables, lens_t = make_case(torch.float32, 9, 3, 64, lens, seed=1)
    scale = 0.125
    batched = kernel(q, kc, vc, tables, lens_t, BLOCK, scale)
    one_thread = cpu_kernels.PagedDecodeKernel(cpu_kernels.load_library(), num_threads=1)
    assert torch.equal(one_thread(q, kc, vc, tables, lens_t, BLOCK, scale), batched)
    for i in range(len(lens)):
        alone = kernel(q[i : i + 1], kc, vc, tables[i : i + 1], lens_t[i : i + 1], BLOCK, scale)
        assert torch.equal(alone[0], batched[i])


@needs_compiler
def test_kernel_reads_only_the_table_blocks(kernel):
    """Poisoning every block outside the tables changes nothing: the pool is not scanned."""
    q, kc, vc, tables, lens_t = make_case(torch.float32, 9, 3, 64, [20, 9])
    before = kernel(q, kc, vc, tables, lens_t, BLOCK, 0.125)
    used = torch.zeros(kc.shape[0] // BLOCK, dtype=torch.bool)
    used[tables[0, :2]] = True
    used[tables[1, :1]] = True
    for cache in (kc, vc):
        cache.view(-1, BLOCK, *cache.shape[1:])[~used] = float("nan")
    assert torch.equal(kernel(q, kc, vc, tables, lens_t, BLOCK, 0.125), before)


@needs_compiler
def test_window_reads_only_the_last_positions(kernel):
    """Gemma 3's shape (4 heads, 1 KV head, dim 256), window 20: equal to the PyTorch path's
    window mask, and blocks wholly before each window are never read (poisoned: no change)."""
    lens, window = [1, 20, 21, 40, 100], 20
    q, kc, vc, tables, lens_t = make_case(torch.float32, 4, 1, 256, lens, seed=2)
    got = kernel(q, kc, vc, tables, lens_t, BLOCK, 0.0625, window)
    last = lens_t - 1
    slots = tables[torch.arange(len(lens)), last // BLOCK] * BLOCK + last % BLOCK
    pos = torch.arange(int(lens_t.max()))
    mask = (pos < lens_t[:, None]) & (pos >= lens_t[:, None] - window)
    meta = AttentionMetadata(slot_mapping=slots, block_size=BLOCK, num_decodes=len(lens),
                             decode_blocks=tables, decode_len=int(lens_t.max()),
                             decode_mask=mask[:, None, None, :], window=window)
    expected = paged_attention(q, kc[slots].clone(), vc[slots].clone(), kc, vc, meta, 0.0625)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lens):
        for b in range(max(0, n - window) // BLOCK):  # blocks before the window's first
            kc.view(-1, BLOCK, 1, 256)[tables[i, b]] = float("nan")
    assert torch.equal(kernel(q, kc, vc, tables, lens_t, BLOCK, 0.0625, window), got)


@needs_compiler
def test_unsupported_inputs_are_refused(kernel):
    q = torch.zeros(2, 4, 96)  # head_dim 96 has no compiled variant
    cache = torch.zeros(32, 2, 96)
    assert not kernel.supports(q, cache)
    assert not kernel.supports(torch.zeros(2, 4, 64, dtype=torch.float16),
                               torch.zeros(32, 2, 64, dtype=torch.float16))
    assert kernel.supports(torch.zeros(2, 4, 64), torch.zeros(32, 2, 64))
    with pytest.raises(ValueError, match="unsupported shape"):
        kernel(q, cache, cache, torch.zeros(2, 2, dtype=torch.long),
               torch.ones(2, dtype=torch.long), BLOCK, 0.1)


def test_switched_off_or_without_compiler_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    cpu_kernels.load_library.cache_clear()
    try:
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
        assert cpu_kernels.paged_decode_kernel(2) is None
        cpu_kernels.load_library.cache_clear()
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "1")
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        with caplog.at_level(logging.WARNING, logger="kvserve"):
            assert cpu_kernels.paged_decode_kernel(2) is None
        assert "no C++ compiler" in caplog.text
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_kernels.load_library.cache_clear()


@needs_compiler
def test_broken_build_warns_and_falls_back(monkeypatch, tmp_path, caplog):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "SOURCES", [*cpu_kernels.SOURCES, bad])
    cpu_kernels.load_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kvserve"):
            assert cpu_kernels.paged_decode_kernel(2) is None
        assert "could not build the CPU attention kernel" in caplog.text
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("tmp*"))
    finally:
        cpu_kernels.load_library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_kernel_matches_torch(dtype, tol):
    kernel = cpu_kernels.rms_norm_kernel()
    g = torch.Generator().manual_seed(2)
    x, res, weight = (torch.randn(shape, generator=g).to(dtype) for shape in
                      [(7, 576), (7, 576), (576,)])
    out, same = kernel(x, None, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(out, torch.rms_norm(x, (576,), weight, 1e-5), atol=tol, rtol=tol)

    expected_sum = x + res
    expected = torch.rms_norm(expected_sum, (576,), weight, 1e-5)
    out, new_res = kernel(x, res, weight, 1e-5)
    assert new_res is res  # the sum is written into the residual stream in place
    assert torch.equal(res, expected_sum)  # rounded to dtype exactly as torch's add
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert torch.equal(kernel(x[3:4].clone(), None, weight, 1e-5)[0][0],
                       kernel(x, None, weight, 1e-5)[0][3])  # rows do not see the batch


@needs_compiler
def test_rms_norm_kernel_refuses_what_it_cannot_read():
    kernel = cpu_kernels.rms_norm_kernel()
    w = torch.ones(8)
    assert kernel.supports(torch.zeros(2, 8), None, w)
    assert not kernel.supports(torch.zeros(8, 2).t(), None, w)  # not contiguous
    assert not kernel.supports(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), w)
    assert not kernel.supports(torch.zeros(2, 8, dtype=torch.float16), None,
                               w.to(torch.float16))


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
def test_silu_mul_kernel_matches_float64(dtype, tol):
    kernel = cpu_kernels.silu_mul_kernel()
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(5, 2 * 1536, generator=g) * 8).to(dtype)
    gate_up[0, :3] = torch.tensor([0.0, -100.0, 100.0])  # exp's clamp at both ends
    gate, up = gate_up.double().split(1536, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    out = kernel(gate_up)
    assert out.shape == (5, 1536) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    assert out[0, 0] == 0 and abs(out[0, 1]) < 1e-30 and out[0, 2] == gate_up[0, 1538] * 100
    assert torch.equal(kernel(gate_up[2:3].clone())[0], out[2])  # rows do not see the batch
    assert not kernel.supports(gate_up.t())  # not contiguous
    assert not kernel.supports(gate_up.to(torch.float16))


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_cache_kernel_matches_torch(dtype, tol):
    """Rotated q and k as apply_rope makes them; k and v land in their slots, nothing else
    in the cache changes."""
    from kvserve.model.llama import apply_rope

    kernel = cpu_kernels.rope_cache_kernel()
    nh, nkv, hd, tokens = 9, 3, 64, 5
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (nh + 2 * nkv) * hd, generator=g).to(dtype)
    angles = torch.rand(100, hd // 2, generator=g) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    positions = torch.tensor([0, 7, 8, 99, 42])
    slots = torch.tensor([3, 12, 0, 30, 17])
    k_cache, v_cache = torch.zeros(32, nkv, hd, dtype=dtype), torch.zeros(32, nkv, hd, dtype=dtype)
    q, k = kernel(qkv, nh, nkv, hd, cos, sin, positions, slots, k_cache, v_cache)

    qk = qkv[:, : (nh + nkv) * hd].view(tokens, nh + nkv, hd)
    rotated = apply_rope(qk.float(), cos[positions, None], sin[positions, None])
    torch.testing.assert_close(q.float(), rotated[:, :nh], atol=tol, rtol=tol)
    torch.testing.assert_close(k.float(), rotated[:, nh:], atol=tol, rtol=tol)
    assert torch.equal(k_cache[slots], k)
    assert torch.equal(v_cache[slots], qkv[:, (nh + nkv) * hd :].view(tokens, nkv, hd))
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()
