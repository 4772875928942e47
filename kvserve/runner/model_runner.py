"""Turn a SchedulerOutput into tensors, run one forward pass, sample."""

from __future__ import annotations

import torch

from kvserve.cache.manager import KVCacheManager
from kvserve.engine.request import Request
from kvserve.engine.scheduler import SchedulerOutput
from kvserve.model.attention import AttentionMetadata, PrefillSpan
from kvserve.model.config import ModelConfig
from kvserve.model.cpu_kernels import paged_decode_kernel
from kvserve.model.cuda_kernels import flashinfer_decode_kernel
from kvserve.model.llama import LlamaForCausalLM
from kvserve.runner.sampler import make_generator, sample, top_logprobs


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, kv: KVCacheManager,
                 dtype: torch.dtype, device: torch.device, num_threads: int = 1) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.block_size = block_size = kv.block_size
        num_slots = kv.num_blocks * block_size
        # [layers, K/V, slots, kv_heads, head_dim], allocated once.
        self.kv_cache = torch.zeros(config.num_layers, 2, num_slots, config.num_kv_heads,
                                    config.head_dim, dtype=dtype, device=device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache = self.kv_cache[i, 0]
            layer.self_attn.v_cache = self.kv_cache[i, 1]
        # Decode attention that reads the paged cache in place: our C++ kernel on a CPU,
        # flashinfer's on CUDA when it is installed; None: the PyTorch path (attention.py).
        if device.type == "cpu":
            kernel = paged_decode_kernel(num_threads)
        else:
            kernel = flashinfer_decode_kernel(config.num_heads, config.num_kv_heads,
                                              config.head_dim, dtype, device)
        probe = torch.empty(1, config.num_heads, config.head_dim, dtype=dtype, device=device)
        ok = kernel is not None and kernel.supports(probe, self.kv_cache[0, 0])
        self.decode_kernel = kernel if ok else None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Returns the sampled token of each request that reached its end this step."""
        self._transfer_blocks()
        batch = sorted((s for s in out.scheduled if s[1]), key=lambda s: s[1] != 1)  # decodes 1st
        rows, to_sample = [], []
        if batch:
            input_ids, positions, meta = self._prepare(batch)
            hidden = self.model(input_ids, positions, meta)
            ends, offset = [], 0
            for request, num_new in batch:
                offset += num_new
                if request.num_computed_tokens + num_new == request.num_tokens:
                    ends.append(offset - 1)
                    to_sample.append(request)
            if ends:
                rows.append(self.model.compute_logits(hidden[ends]))  # [N, vocab]
        for request, num_new in out.scheduled:
            if num_new == 0:  # an exact repeat: its first token comes from kept logits
                rows.append(request.cached_logits.to(self.device).unsqueeze(0))
                to_sample.append(request)
                request.cached_logits = None
        if not to_sample:
            return {}
        logits = torch.cat(rows) if len(rows) > 1 else rows[0]
        return self._sample(to_sample, logits)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> dict[str, int]:
        for r in requests:
            if r.generator is None and r.params.seed is not None:
                r.generator = make_generator(r.params.seed, self.device)
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        for i, r in enumerate(requests):
            if r.params.logprobs is not None:
                r.logprobs.append(top_logprobs(logits[i], [tokens[i]], r.params.logprobs))
            if r.num_output_tokens == 0:
                self.kv.remember_logits(r, logits[i].to("cpu", copy=True))
        return {r.request_id: t for r, t in zip(requests, tokens)}

    def _transfer_blocks(self) -> None:
        """Evicted blocks out to the host/disk tier first, then tier hits into their blocks."""
        saves, loads = self.kv.take_transfers()
        for block_id, block_hash, tokens in saves:
            self.kv.store_evicted(block_hash, tokens, self._block(block_id).to("cpu", copy=True))
        for block_id, payload in loads:
            block = self._block(block_id)
            block.copy_(payload.reshape(block.shape))

    def _block(self, block_id: int) -> torch.Tensor:
        """[layers, K/V, block_size, kv_heads, head_dim] view of one block."""
        start = block_id * self.block_size
        return self.kv_cache[:, :, start : start + self.block_size]

    def _prepare(self, batch: list[tuple[Request, int]]):
        ids: list[int] = []
        pos: list[int] = []
        decodes = [(r, n) for r, n in batch if n == 1]
        prefills: list[PrefillSpan] = []
        for request, num_new in batch:
            start = request.num_computed_tokens
            if num_new > 1:
                prefills.append(self._prefill_span(request, len(ids), num_new))
            ids.extend(request.token_ids_slice(start, start + num_new))
            pos.extend(range(start, start + num_new))
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        tables = [r.block_table for r, _ in batch]
        owners = torch.repeat_interleave(
            torch.arange(len(batch), device=self.device),
            torch.tensor([n for _, n in batch], device=self.device))
        blocks = self._padded(tables)[owners, positions // self.block_size]
        slot_mapping = blocks * self.block_size + positions % self.block_size
        meta = AttentionMetadata(slot_mapping=slot_mapping, positions=positions,
                                 block_size=self.block_size,
                                 prefills=tuple(prefills), decode_kernel=self.decode_kernel)
        if decodes:
            meta.num_decodes = len(decodes)
            lens = [r.num_computed_tokens + 1 for r, _ in decodes]
            max_len = max(lens)
            meta.decode_blocks = self._padded([r.block_table for r, _ in decodes])
            meta.decode_len = max_len
            meta.decode_lens = torch.tensor(lens, device=self.device)
            if min(lens) != max_len and self.decode_kernel is None:
                mask = torch.arange(max_len, device=self.device) < meta.decode_lens.unsqueeze(1)
                meta.decode_mask = mask[:, None, None, :]  # [D, 1, 1, max_len]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return input_ids, positions, meta

    def _prefill_span(self, request: Request, start: int, num_new: int) -> PrefillSpan:
        span = PrefillSpan(start=start, num_new=num_new)
        num_computed = request.num_computed_tokens
        if num_computed:
            num_ctx = num_computed + num_new
            span.context_blocks = torch.tensor(request.block_table, device=self.device)
            q_pos = torch.arange(num_computed, num_ctx, device=self.device)
            span.mask = torch.arange(num_ctx, device=self.device) <= q_pos.unsqueeze(1)
        return span

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.long, device=self.device)
