"""Attention over a paged KV cache, in plain PyTorch.

The cache of one layer is two flat tensors of slots, ``[num_slots, num_kv_heads, head_dim]``,
where slot = block_id * block_size + offset. New keys and values are written through the
step's slot mapping; a sequence reads its context back block by block through its block
table, so a step touches only the blocks it attends to, never the whole pool.

The tokens of one step are laid out decodes first (one query token per sequence, batched
into a single padded attention call), then prefill chunks (one call per sequence). On a CPU
the decodes go to a C++ kernel (cpu_kernels.py) that reads the blocks in place instead.

The cache may hold another dtype than the activations (kv_quant.py: a float dtype, or int8
rows with a scale each, keys rotated). With int8 and the C++ kernel, prefill chunks go to the
decode kernel too, one query per row with its own causal length, reading the rows in place: each
query token is then computed exactly as a decode of it would be, so chunking, preemption
and prefix hits cannot move a value across a rounding step of the quantizer. Otherwise the
PyTorch path converts only what a sequence reads: the blocks of its table, gathered, never
the pool; a chunk without earlier context reads its own keys and values back from their
slots too, so it sees what a later chunk, a decode or a prefix hit will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvserve.model.kv_quant import from_cache, to_cache

if TYPE_CHECKING:
    from kvserve.model.cpu_kernels import PagedDecodeKernel


@dataclass
class PrefillSpan:
    """One sequence's chunk of query tokens in the step.

    ``| context already in the cache | this chunk (num_new) |``; ``context_blocks`` covers
    both (the chunk is written before it is read). Without earlier context the chunk attends
    only to itself, so the fresh keys are used directly and ``context_blocks`` is None.
    With a sliding window, ``context_blocks`` starts at the block of the first position the
    chunk's first query sees, and ``mask`` (also set for a chunk longer than the window
    without context) hides what lies outside each query's window.
    """

    start: int  # index of the chunk's first token in the step
    num_new: int
    context_blocks: torch.Tensor | None = None  # [blocks] the sequence's block table
    mask: torch.Tensor | None = None  # [num_new, num_computed + num_new], True = attend
    block_table: torch.Tensor | None = None  # [blocks] always, for reading int8 in place


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot each new token's K/V is written to
    positions: torch.Tensor | None = None  # [num_tokens], for kernels that fuse the rope
    block_size: int = 16
    num_decodes: int = 0
    decode_blocks: torch.Tensor | None = None  # [num_decodes, max_blocks] tables, padded with 0
    decode_len: int = 0  # the longest decode context
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, decode_len]; None: no padding
    decode_lens: torch.Tensor | None = None  # [num_decodes] context length of each decode
    decode_kernel: PagedDecodeKernel | None = None  # None: the PyTorch path
    prefills: tuple[PrefillSpan, ...] = ()
    window: int = 0  # sliding window of this KV cache group's layers (0: full attention)


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim (+ 4: int8 rows)]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_written: bool = False,  # True: k and v are already in their cache slots
) -> torch.Tensor:  # [T, num_heads, head_dim]
    converted = k_cache.dtype != q.dtype  # the cache holds another dtype (kv_quant.py)
    if not kv_written:
        k_cache.index_copy_(0, meta.slot_mapping, to_cache(k, k_cache.dtype, key=True))
        v_cache.index_copy_(0, meta.slot_mapping, to_cache(v, v_cache.dtype))
    parts = []  # in token order: the decodes, then each prefill chunk
    bs = meta.block_size
    d = meta.num_decodes
    if d and meta.decode_kernel is not None:
        parts.append(meta.decode_kernel(q[:d], k_cache, v_cache, meta.decode_blocks,
                                        meta.decode_lens, bs, scale, meta.window))
    elif d:
        assert meta.decode_blocks is not None
        kd = from_cache(gather(k_cache, meta.decode_blocks, meta.decode_len, bs),
                        q.dtype, key=True).transpose(1, 2)
        vd = from_cache(gather(v_cache, meta.decode_blocks, meta.decode_len, bs),
                        q.dtype).transpose(1, 2)
        qd = q[:d].unsqueeze(2)  # [d, num_heads, 1, head_dim]
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        parts.append(o.squeeze(2))
    in_place = meta.decode_kernel is not None and k_cache.dtype == torch.int8
    for span in meta.prefills:  # 4-D [1, heads, tokens, head_dim]: SDPA's fused CPU kernel
        end = span.start + span.num_new  # (3-D takes the unfused path, measured 5x slower)
        if in_place and span.block_table is not None and meta.positions is not None:
            tables = span.block_table.expand(span.num_new, -1)  # one table, stride 0
            lens = meta.positions[span.start : end] + 1  # causal: up to and with itself
            parts.append(meta.decode_kernel(q[span.start : end], k_cache, v_cache, tables,
                                            lens, bs, scale, meta.window))
            continue
        qs = q[span.start : end].transpose(0, 1)[None]  # [1, num_heads, num_new, head_dim]
        if span.context_blocks is None:
            ks, vs = k[span.start : end], v[span.start : end]
            if converted:  # the values as stored, as every later reader sees them
                slots = meta.slot_mapping[span.start : end]
                ks = from_cache(k_cache[slots], q.dtype, key=True)
                vs = from_cache(v_cache[slots], q.dtype)
            ks, vs = ks[None].transpose(1, 2), vs[None].transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask,
                                               is_causal=span.mask is None, scale=scale,
                                               enable_gqa=True)
        else:
            num_ctx = span.mask.shape[1]
            ks = from_cache(gather(k_cache, span.context_blocks[None], num_ctx, bs),
                            q.dtype, key=True).transpose(1, 2)
            vs = from_cache(gather(v_cache, span.context_blocks[None], num_ctx, bs),
                            q.dtype).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale,
                                               enable_gqa=True)
        parts.append(o[0].transpose(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def gather(cache: torch.Tensor, tables: torch.Tensor, num_ctx: int,
           block_size: int) -> torch.Tensor:
    """[slots, kv_heads, row] cache, [rows, blocks] tables -> [rows, num_ctx, kv_heads, row]:
    each row's first num_ctx positions. Whole blocks are copied: fewer, larger
    copies than slot by slot (1.5x faster measured)."""
    rows, num_blocks = tables.shape
    blocks = cache.view(-1, block_size, *cache.shape[1:]).index_select(0, tables.reshape(-1))
    return blocks.view(rows, num_blocks * block_size, *cache.shape[1:])[:, :num_ctx]

