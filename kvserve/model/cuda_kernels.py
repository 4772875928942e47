"""Decode attention on CUDA through flashinfer's paged kernel, when flashinfer is installed.

flashinfer reads K/V in place from pages laid out as ``[pages, page_size, kv_heads,
head_dim]`` ("NHD"), which is exactly a view of our per-layer cache. It is never trusted
blind: ``flashinfer_decode_kernel()`` first runs a small random case through it and through
the PyTorch path, and returns None (with a warning, so the PyTorch path runs) if it raises
or disagrees. float16 and bfloat16 only; float32 uses the PyTorch path.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("kvserve")

DTYPES = (torch.float16, torch.bfloat16)


def paged_kv_layout(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int):
    """Padded block tables [seqs, width] and lengths [seqs] -> flashinfer's CSR page layout:
    indptr [seqs + 1], indices [pages in use], last_page_len [seqs] (1..block_size), int32."""
    num_pages = (context_lens + block_size - 1) // block_size
    indptr = torch.zeros(len(context_lens) + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = torch.cumsum(num_pages, 0)
    in_use = torch.arange(block_tables.shape[1], device=block_tables.device) < num_pages[:, None]
    indices = block_tables[in_use].to(torch.int32)
    last_page_len = (context_lens - (num_pages - 1) * block_size).to(torch.int32)
    return indptr, indices, last_page_len


class FlashInferDecode:
    """Same call as cpu_kernels.PagedDecodeKernel. One plan per step: every layer of a step
    passes the same block-table tensor, so the plan is made when that tensor changes."""

    def __init__(self, flashinfer, device: torch.device, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> None:
        self.workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.shape = (num_heads, num_kv_heads, head_dim)
        self._planned_for: torch.Tensor | None = None

    def supports(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return q.is_cuda and q.dtype in DTYPES and k_cache.dtype == q.dtype

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 scale: float) -> torch.Tensor:
        if self._planned_for is not block_tables:
            indptr, indices, last = paged_kv_layout(block_tables, context_lens, block_size)
            num_heads, num_kv_heads, head_dim = self.shape
            self.wrapper.plan(indptr, indices, last, num_heads, num_kv_heads, head_dim,
                              block_size, pos_encoding_mode="NONE", q_data_type=q.dtype,
                              kv_data_type=k_cache.dtype, sm_scale=scale)
            self._planned_for = block_tables
        pages = (-1, block_size, *k_cache.shape[1:])
        return self.wrapper.run(q.contiguous(), (k_cache.view(pages), v_cache.view(pages)))


def flashinfer_decode_kernel(num_heads: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype, device: torch.device) -> FlashInferDecode | None:
    if device.type != "cuda" or dtype not in DTYPES:
        return None
    try:
        import flashinfer
    except ImportError:
        return None
    try:
        kernel = FlashInferDecode(flashinfer, device, num_heads, num_kv_heads, head_dim)
        error = self_check(kernel, num_heads, num_kv_heads, head_dim, dtype, device)
    except Exception as e:  # an API this code does not know: fall back, say why
        error = f"{type(e).__name__}: {e}"
    if error:
        log.warning("kvserve: flashinfer's decode kernel failed its self-check (%s); using "
                    "the PyTorch attention path", error)
        return None
    return kernel


def self_check(kernel: FlashInferDecode, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> str | None:
    """Two sequences (lengths 5 and 37) on scattered blocks against the PyTorch path."""
    from kvserve.model.attention import AttentionMetadata, paged_attention

    block_size, g = 16, torch.Generator(device="cpu").manual_seed(0)
    k_cache, v_cache = (torch.randn(8 * block_size, num_kv_heads, head_dim, generator=g)
                        .to(device, dtype) for _ in range(2))
    tables = torch.tensor([[5, 0, 0], [2, 7, 3]], device=device)
    lens = torch.tensor([5, 37], device=device)
    q = torch.randn(2, num_heads, head_dim, generator=g).to(device, dtype)
    scale = head_dim**-0.5
    last = lens - 1
    slots = tables[torch.arange(2, device=device), last // block_size] * block_size
    slots = slots + last % block_size
    mask = torch.arange(37, device=device) < lens[:, None]
    meta = AttentionMetadata(slot_mapping=slots, block_size=block_size, num_decodes=2,
                             decode_blocks=tables, decode_len=37,
                             decode_mask=mask[:, None, None, :])
    expected = paged_attention(q, k_cache[slots].clone(), v_cache[slots].clone(), k_cache,
                               v_cache, meta, scale)
    got = kernel(q, k_cache, v_cache, tables, lens, block_size, scale)
    err = (got.float() - expected.float()).abs().max().item()
    return None if err < 2e-2 else f"max abs error {err:.3g} against the PyTorch path"
