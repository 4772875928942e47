"""Attention over a paged KV cache, in plain PyTorch.

The cache of one layer is two flat tensors of slots, ``[num_slots, num_kv_heads, head_dim]``,
where slot = block_id * block_size + offset. New keys and values are written through the
step's slot mapping; a sequence reads its context back through the slots of its block table,
so a step touches only the tokens it attends to, never the whole pool.

The tokens of one step are laid out decodes first (one query token per sequence, batched
into a single padded attention call), then prefill chunks (one call per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's chunk of query tokens in the step.

    ``| context already in the cache | this chunk (num_new) |``; ``context_slots`` covers both
    (the chunk is written before it is read). Without earlier context the chunk attends only
    to itself, so the fresh keys are used directly and ``context_slots`` is None.
    """

    start: int  # index of the chunk's first token in the step
    num_new: int
    context_slots: torch.Tensor | None = None  # [num_computed + num_new]
    mask: torch.Tensor | None = None  # [num_new, num_computed + num_new], True = attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot each new token's K/V is written to
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_context] padded with slot 0
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context]; None: no padding
    prefills: tuple[PrefillSpan, ...] = ()


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    parts = []  # in token order: the decodes, then each prefill chunk
    d = meta.num_decodes
    if d:
        assert meta.decode_slots is not None
        num_ctx = meta.decode_slots.shape[1]
        slots = meta.decode_slots.reshape(-1)
        kd = k_cache.index_select(0, slots).view(d, num_ctx, *k.shape[1:]).transpose(1, 2)
        vd = v_cache.index_select(0, slots).view(d, num_ctx, *v.shape[1:]).transpose(1, 2)
        qd = q[:d].unsqueeze(2)  # [d, num_heads, 1, head_dim]
        o = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        parts.append(o.squeeze(2))
    for span in meta.prefills:
        end = span.start + span.num_new
        qs = q[span.start : end].transpose(0, 1)  # [num_heads, num_new, head_dim]
        if span.context_slots is None:
            ks, vs = k[span.start : end].transpose(0, 1), v[span.start : end].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            ks = k_cache.index_select(0, span.context_slots).transpose(0, 1)
            vs = v_cache.index_select(0, span.context_slots).transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale,
                                               enable_gqa=True)
        parts.append(o.transpose(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
