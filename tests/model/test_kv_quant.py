"""The int8 KV cache (kv_quant.py, csrc/kv_int8.h) against a float64 reference (no model):
the quantizer, the fused rope + K/V write, the C++ decode kernel and the PyTorch path, on
random data, odd lengths and scattered block tables."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvserve.model import cpu_kernels
from kvserve.model.attention import AttentionMetadata, PrefillSpan, paged_attention
from kvserve.model.kv_quant import from_cache, hadamard_size, rotate, to_cache

BLOCK = 16
LENS = [1, 5, 16, 17, 40, 100, 33]

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def group_scales(rows: torch.Tensor, head_dim: int = 64) -> torch.Tensor:
    """The bfloat16 scales of int8 rows, one per 16 values, as float64 [..., groups, 1]."""
    return rows[..., head_dim:].contiguous().view(torch.bfloat16).double().unsqueeze(-1)


def assert_scales_fit(scale: torch.Tensor, x: torch.Tensor) -> None:
    """Each group's scale is absmax / 127 rounded up to the next bfloat16 (or equal)."""
    amax = x.double().unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True) / 127
    assert torch.equal(scale, scale.bfloat16().double())
    assert (scale >= amax).all() and (scale <= amax * (1 + 2**-7)).all()


def test_int8_rows_hold_values_and_group_scales():
    """A row is 64 int8 values and a bfloat16 scale per 16 of them (72 bytes); each value is
    within half its group's step, and a group's largest value takes (almost) all 127 levels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=g) * torch.rand(7, 3, 1, generator=g) * 10
    x[..., 16:32] *= 50  # one loud group: the others keep their own step
    x[2, 1] = 0  # an all-zero row: scale 0, values 0
    rows = to_cache(x, torch.int8)
    assert rows.shape == (7, 3, 72) and rows.dtype == torch.int8
    scale = group_scales(rows)
    assert_scales_fit(scale, x)
    values = rows[..., :64].unflatten(-1, (4, 16))
    assert values.abs().max() == 127 and (values.abs().amax(-1)[scale[..., 0] > 0] >= 126).all()
    back = from_cache(rows, torch.float64)
    assert back.dtype == torch.float64 and back.shape == x.shape
    step = scale.expand(-1, -1, -1, 16).flatten(-2)
    assert ((back - x).abs() <= step / 2 * (1 + 1e-6)).all()  # within half a step
    quiet = (back - x)[..., :16].abs().max()
    assert quiet * 20 < (back - x)[..., 16:32].abs().max()  # not the loud group's step
    assert not back[2, 1].any()
    assert torch.equal(from_cache(to_cache(x, torch.bfloat16), torch.float32),
                       x.bfloat16().float())


def test_key_rows_are_rotated_before_quantizing():
    """A key row is rotated (an orthogonal map up to the block size) and then quantized: it
    comes back within the quantizer's step, and a row with a few large channels, as keys
    have, comes back several times closer than without the rotation."""
    g = torch.Generator().manual_seed(1)
    for head_dim, block in ((64, 64), (128, 128), (96, 32)):
        assert hadamard_size(head_dim) == block
        x = torch.randn(5, 2, head_dim, generator=g, dtype=torch.float64)
        assert torch.allclose(rotate(rotate(x)), x * block)
        assert torch.allclose(rotate(x).norm(dim=-1), x.norm(dim=-1) * block**0.5)
    x = torch.randn(200, 3, 64, generator=g)
    x[..., [5, 37]] *= 30  # two outlier channels
    err = {key: (from_cache(to_cache(x, torch.int8, key=key), torch.float64, key=key)
                 - x.double()).pow(2).mean().item() for key in (False, True)}
    assert err[True] * 4 < err[False], err
    assert_scales_fit(group_scales(to_cache(x, torch.int8, key=True)), rotate(x))


def make_case(q_dtype, cache_dtype, num_heads, num_kv_heads, head_dim, lens, seed=0):
    """q, the two caches (in ``cache_dtype``), scattered block tables and lengths."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    shape = (num_blocks * BLOCK, num_kv_heads, head_dim)
    k_cache = to_cache(torch.randn(shape, generator=g) * 2, cache_dtype, key=True)
    v_cache = to_cache(torch.randn(shape, generator=g), cache_dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // BLOCK) for n in lens)
    tables = []
    for n in lens:
        need = -(-n // BLOCK)
        table, order = order[:need], order[need:]
        tables.append(table + [0] * (width - need))
    qk = torch.randn(len(lens), num_heads + num_kv_heads, head_dim, generator=g).to(q_dtype)
    return (qk[:, :num_heads], k_cache, v_cache, torch.tensor(tables),
            torch.tensor(lens, dtype=torch.long))


def reference(q, k_cache, v_cache, tables, lens, scale, num_queries=1):
    """float64 attention of each sequence's last ``num_queries`` positions, causal."""
    k64, v64 = from_cache(k_cache, torch.float64, key=True), from_cache(v_cache, torch.float64)
    group = q.shape[1] // k64.shape[1]
    outs = []
    for i, n in enumerate(lens.tolist()):
        slots = torch.tensor([tables[i, t // BLOCK] * BLOCK + t % BLOCK for t in range(n)])
        k = k64[slots].repeat_interleave(group, 1).transpose(0, 1)  # [heads, n, head_dim]
        v = v64[slots].repeat_interleave(group, 1).transpose(0, 1)
        qs = q[i * num_queries : (i + 1) * num_queries].double().transpose(0, 1)
        s = qs @ k.transpose(1, 2) * scale  # [heads, num_queries, n]
        q_pos = torch.arange(n - num_queries, n)
        s = s.masked_fill(torch.arange(n) > q_pos[:, None], float("-inf"))
        outs.append((s.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernels.paged_decode_kernel(num_threads=2)
    assert k is not None, "g++ is installed, so the kernel must build"
    return k


@needs_compiler
@pytest.mark.parametrize("q_dtype,cache_dtype,heads,kv_heads,head_dim,tol", [
    (torch.float32, torch.int8, 9, 3, 64, 1e-5), (torch.float32, torch.int8, 4, 4, 128, 1e-5),
    (torch.bfloat16, torch.int8, 9, 3, 64, 2e-2), (torch.float32, torch.int8, 8, 1, 64, 1e-5),
    (torch.float32, torch.bfloat16, 9, 3, 64, 1e-5)])
def test_decode_kernel_matches_float64(kernel, q_dtype, cache_dtype, heads, kv_heads,
                                       head_dim, tol):
    q, kc, vc, tables, lens = make_case(q_dtype, cache_dtype, heads, kv_heads, head_dim, LENS)
    assert kernel.supports(q, kc)
    scale = head_dim**-0.5
    got = kernel(q, kc, vc, tables, lens, BLOCK, scale)
    assert got.dtype == q_dtype
    torch.testing.assert_close(got.double(), reference(q, kc, vc, tables, lens, scale),
                               atol=tol, rtol=tol)


@needs_compiler
def test_int8_decode_does_not_depend_on_batch(kernel):
    q, kc, vc, tables, lens = make_case(torch.float32, torch.int8, 9, 3, 64, [7, 70, 31, 2], 1)
    batched = kernel(q, kc, vc, tables, lens, BLOCK, 0.125)
    for i in range(len(lens)):
        alone = kernel(q[i : i + 1], kc, vc, tables[i : i + 1], lens[i : i + 1], BLOCK, 0.125)
        assert torch.equal(alone[0], batched[i])


@pytest.mark.parametrize("q_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_torch_path_decode_and_prefill_match_float64(q_dtype, tol):
    """The PyTorch path on an int8 cache: decodes (padded) and a chunk with earlier context,
    nothing written (the new rows are already in their slots)."""
    q, kc, vc, tables, lens = make_case(q_dtype, torch.int8, 9, 3, 64, LENS, seed=2)
    last = lens - 1
    slots = tables[torch.arange(len(LENS)), last // BLOCK] * BLOCK + last % BLOCK
    mask = torch.arange(int(lens.max())) < lens[:, None]
    meta = AttentionMetadata(slot_mapping=slots, block_size=BLOCK, num_decodes=len(LENS),
                             decode_blocks=tables, decode_len=int(lens.max()),
                             decode_mask=mask[:, None, None, :])
    got = paged_attention(q, None, None, kc, vc, meta, 0.125, kv_written=True)
    torch.testing.assert_close(got.double(), reference(q, kc, vc, tables, lens, 0.125),
                               atol=tol, rtol=tol)

    n, new = 40, 7  # a 7-token chunk after 33 tokens of context, of sequence 4
    g = torch.Generator().manual_seed(3)
    qs = torch.randn(new, 9, 64, generator=g).to(q_dtype)
    q_pos = torch.arange(n - new, n)
    span = PrefillSpan(start=0, num_new=new, context_blocks=tables[4],
                       mask=torch.arange(n) <= q_pos[:, None])
    meta = AttentionMetadata(slot_mapping=torch.zeros(new, dtype=torch.long), block_size=BLOCK,
                             prefills=(span,))
    got = paged_attention(qs, None, None, kc, vc, meta, 0.125, kv_written=True)
    expected = reference(qs, kc, vc, tables[4:5], torch.tensor([n]), 0.125, num_queries=new)
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@needs_compiler
@pytest.mark.parametrize("q_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_int8_prefill_reads_rows_in_place_with_the_kernel(kernel, q_dtype, tol):
    """With the kernel, a chunk's queries each attend causally through the decode kernel:
    a chunk with earlier context and one without, as float64 says, and each query exactly
    as a decode of it alone."""
    _, kc, vc, tables, _ = make_case(q_dtype, torch.int8, 9, 3, 64, LENS, seed=5)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(12, 9, 64, generator=g).to(q_dtype)
    spans = (PrefillSpan(start=0, num_new=5, block_table=tables[0]),  # positions 0..4
             PrefillSpan(start=5, num_new=7, block_table=tables[4],  # positions 33..39
                         context_blocks=tables[4], mask=torch.ones(7, 40, dtype=torch.bool)))
    positions = torch.tensor([0, 1, 2, 3, 4, *range(33, 40)])
    meta = AttentionMetadata(slot_mapping=torch.zeros(12, dtype=torch.long), block_size=BLOCK,
                             positions=positions, decode_kernel=kernel, prefills=spans)
    got = paged_attention(q, None, None, kc, vc, meta, 0.125, kv_written=True)
    expected = torch.cat([
        reference(q[:5], kc, vc, tables[0:1], torch.tensor([5]), 0.125, num_queries=5),
        reference(q[5:], kc, vc, tables[4:5], torch.tensor([40]), 0.125, num_queries=7)])
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    alone = kernel(q[8:9], kc, vc, tables[4:5], torch.tensor([37]), BLOCK, 0.125)
    assert torch.equal(alone[0], got[8])


@needs_compiler
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.int8),
                                               (torch.bfloat16, torch.int8),
                                               (torch.float32, torch.bfloat16)])
def test_rope_kernel_writes_rows_as_to_cache(dtype, cache_dtype):
    """The fused write stores exactly what to_cache makes of the rotated k and of v, bit for
    bit, so the PyTorch path and the kernel quantize a row the same way."""
    kernel = cpu_kernels.rope_cache_kernel()
    nh, nkv, hd, tokens = 9, 3, 64, 5
    g = torch.Generator().manual_seed(4)
    qkv = (torch.randn(tokens, (nh + 2 * nkv) * hd, generator=g) * 3).to(dtype)
    angles = torch.rand(100, hd // 2, generator=g) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    positions, slots = torch.tensor([0, 7, 8, 99, 42]), torch.tensor([3, 12, 0, 30, 17])
    width = cpu_kernels.row_width(hd, cache_dtype)
    k_cache = torch.zeros(32, nkv, width, dtype=cache_dtype)
    v_cache = torch.zeros(32, nkv, width, dtype=cache_dtype)
    assert kernel.supports(qkv, cos, k_cache)
    _, k = kernel(qkv, nh, nkv, hd, cos, sin, positions, slots, k_cache, v_cache)
    v = qkv[:, (nh + nkv) * hd :].view(tokens, nkv, hd)
    assert torch.equal(k_cache[slots], to_cache(k, cache_dtype, key=True))
    assert torch.equal(v_cache[slots], to_cache(v, cache_dtype))
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()
