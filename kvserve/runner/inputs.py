"""The tensors of one forward pass: input ids, positions, slot mapping, attention metadata.

There is one AttentionMetadata per KV cache group (the model's layers of one window): the
groups share the tokens and positions but have their own blocks, so their own slot mapping
and tables. A model without a sliding window has one group.
"""

from __future__ import annotations

import torch

from kvserve import faults
from kvserve.model.attention import AttentionMetadata, PrefillSpan
from kvserve.model.cpu_kernels import PagedDecodeKernel
from kvserve.step import NULL_BLOCK, ScheduledRequest


def prepare_inputs(batch: list[ScheduledRequest], block_size: int, device: torch.device,
                   decode_kernel: PagedDecodeKernel | None, windows: tuple[int, ...] = (0,)
                   ) -> tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]:
    """``batch``: decodes (one new token) first, then prefill chunks. ``windows``: each KV
    cache group's sliding window (0: full attention)."""
    ids: list[int] = []
    pos: list[int] = []
    for s in batch:
        faults.check("runner", s.request_id)
        ids.extend(s.token_ids)
        pos.extend(range(s.start, s.start + s.num_new_tokens))
    positions = torch.tensor(pos, dtype=torch.long, device=device)
    metas = [group_metadata(batch, g, window, block_size, device, decode_kernel, positions)
             for g, window in enumerate(windows)]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    return input_ids, positions, metas


def group_metadata(batch: list[ScheduledRequest], group: int, window: int, block_size: int,
                   device: torch.device, decode_kernel: PagedDecodeKernel | None,
                   positions: torch.Tensor) -> AttentionMetadata:
    tables = [s.table(group) for s in batch]
    # in Python: a decode step's few slots cost ~0.1 ms more as tensor indexing
    slots = [max(table[p // block_size], 0) * block_size + p % block_size
             for s, table in zip(batch, tables) for p in range(s.start, s.start + s.num_new_tokens)]
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    prefills, offset = [], 0
    for s, table in zip(batch, tables):
        if s.num_new_tokens > 1:
            prefills.append(prefill_span(s, table, offset, block_size, window, device))
        offset += s.num_new_tokens
    meta = AttentionMetadata(slot_mapping=slot_mapping, positions=positions,
                             block_size=block_size, prefills=tuple(prefills),
                             decode_kernel=decode_kernel, window=window)
    decodes = [(s, table) for s, table in zip(batch, tables) if s.num_new_tokens == 1]
    if decodes:
        meta.num_decodes = len(decodes)
        lens = [s.start + 1 for s, _ in decodes]
        max_len = max(lens)
        meta.decode_blocks = padded([table for _, table in decodes], device)
        meta.decode_len = max_len
        meta.decode_lens = torch.tensor(lens, device=device)
        if decode_kernel is None and (min(lens) != max_len or window and max_len > window):
            lens_t = meta.decode_lens.unsqueeze(1)
            key_pos = torch.arange(max_len, device=device)
            mask = key_pos < lens_t
            if window:
                mask &= key_pos >= lens_t - window
            meta.decode_mask = mask[:, None, None, :]  # [D, 1, 1, max_len]
    return meta


def prefill_span(s: ScheduledRequest, table: list[int], offset: int, block_size: int,
                 window: int, device: torch.device) -> PrefillSpan:
    """``| not seen (window) | context from the first block seen | this chunk |``"""
    span = PrefillSpan(start=offset, num_new=s.num_new_tokens,
                       block_table=torch.tensor(table, device=device))
    num_ctx = s.start + s.num_new_tokens
    first = max(0, s.start - window + 1) // block_size if window else 0  # first block read
    if s.start:
        span.context_blocks = torch.tensor(table[first:-(-num_ctx // block_size)],
                                           device=device)
    elif not window or s.num_new_tokens <= window:
        return span  # causal over the chunk itself: no mask needed
    q_pos = torch.arange(s.start, num_ctx, device=device).unsqueeze(1)
    k_pos = torch.arange(first * block_size, num_ctx, device=device)
    span.mask = k_pos <= q_pos
    if window:
        span.mask &= k_pos > q_pos - window
    return span


def padded(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Tables as one tensor, padded (and NULL_BLOCK entries replaced) with block 0, which
    only masked positions read."""
    width = max(len(t) for t in tables)
    rows = [[max(b, 0) for b in t] + [0] * (width - len(t)) if NULL_BLOCK in t
            else t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(rows, dtype=torch.long, device=device)
