"""The tensors of one forward pass: input ids, positions, slot mapping, attention metadata."""

from __future__ import annotations

import torch

from kvserve import faults
from kvserve.model.attention import AttentionMetadata, PrefillSpan
from kvserve.model.cpu_kernels import PagedDecodeKernel
from kvserve.step import ScheduledRequest


def prepare_inputs(batch: list[ScheduledRequest], block_size: int, device: torch.device,
                   decode_kernel: PagedDecodeKernel | None
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``batch``: decodes (one new token) first, then prefill chunks."""
    ids: list[int] = []
    pos: list[int] = []
    decodes = [s for s in batch if s.num_new_tokens == 1]
    prefills: list[PrefillSpan] = []
    for s in batch:
        faults.check("runner", s.request_id)
        if s.num_new_tokens > 1:
            prefills.append(prefill_span(s, len(ids), device))
        ids.extend(s.token_ids)
        pos.extend(range(s.start, s.start + s.num_new_tokens))
    positions = torch.tensor(pos, dtype=torch.long, device=device)
    owners = torch.repeat_interleave(
        torch.arange(len(batch), device=device),
        torch.tensor([s.num_new_tokens for s in batch], device=device))
    blocks = padded([s.block_table for s in batch], device)[owners, positions // block_size]
    slot_mapping = blocks * block_size + positions % block_size
    meta = AttentionMetadata(slot_mapping=slot_mapping, positions=positions,
                             block_size=block_size, prefills=tuple(prefills),
                             decode_kernel=decode_kernel)
    if decodes:
        meta.num_decodes = len(decodes)
        lens = [s.start + 1 for s in decodes]
        max_len = max(lens)
        meta.decode_blocks = padded([s.block_table for s in decodes], device)
        meta.decode_len = max_len
        meta.decode_lens = torch.tensor(lens, device=device)
        if min(lens) != max_len and decode_kernel is None:
            mask = torch.arange(max_len, device=device) < meta.decode_lens.unsqueeze(1)
            meta.decode_mask = mask[:, None, None, :]  # [D, 1, 1, max_len]
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    return input_ids, positions, meta


def prefill_span(s: ScheduledRequest, offset: int, device: torch.device) -> PrefillSpan:
    span = PrefillSpan(start=offset, num_new=s.num_new_tokens,
                       block_table=torch.tensor(s.block_table, device=device))
    if s.start:
        num_ctx = s.start + s.num_new_tokens
        span.context_blocks = torch.tensor(s.block_table, device=device)
        q_pos = torch.arange(s.start, num_ctx, device=device)
        span.mask = torch.arange(num_ctx, device=device) <= q_pos.unsqueeze(1)
    return span


def padded(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    rows = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(rows, dtype=torch.long, device=device)
