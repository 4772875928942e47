"""A SchedulerOutput in, one forward pass, sampled tokens out as a RunnerOutput.

The runner owns the KV tensors and the per-request sampling generators; it reads the step's
plain values and never changes a request. Failures stay with their request: a block that
cannot be loaded skips that request's forward pass, a forward pass that raises is retried
one request at a time (the kernels are batch-invariant, so the others' tokens do not
change), and sampling is guarded per request.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvserve import faults
from kvserve.model.config import ModelConfig
from kvserve.model.cpu_kernels import paged_decode_kernel
from kvserve.model.cuda_kernels import flashinfer_decode_kernel
from kvserve.model.kv_quant import KV_DTYPES
from kvserve.runner.inputs import prepare_inputs
from kvserve.runner.sampler import (
    apply_penalties,
    apply_token_bitmask,
    make_generator,
    one_thread,
    sample_row,
    top_logprobs,
)
from kvserve.step import BlockSave, RunnerOutput, ScheduledRequest, SchedulerOutput

log = logging.getLogger("kvserve")
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: rows of [vocab] logits computed at once


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int | list[int],
                 block_size: int, dtype: torch.dtype, device: torch.device,
                 num_threads: int = 1, eos_token_ids: tuple[int, ...] = (),
                 kv_dtype: str | None = None) -> None:
        """``num_blocks``: of each KV cache group (config.kv_groups()); an int for one group.
        ``kv_dtype``: what the cache holds (kv_quant.py); None: the activation dtype."""
        self.model, self.device, self.block_size = model, device, block_size
        self.eos_token_ids = eos_token_ids  # masked until a request's min_tokens
        cache_dtype = KV_DTYPES[kv_dtype] if kv_dtype else dtype
        row = config.kv_row_width(kv_dtype) if kv_dtype else config.head_dim
        groups = config.kv_groups()
        counts = [num_blocks] if isinstance(num_blocks, int) else num_blocks
        assert len(counts) == len(groups), "one block count per KV cache group"
        self.windows = tuple(window for window, _ in groups)
        # One tensor per group, [group layers, K/V, slots, kv_heads, row], allocated once;
        # row = head_dim (+ 4 for int8).
        self.kv_caches = [
            torch.zeros(len(layers), 2, n * block_size, config.num_kv_heads, row,
                        dtype=cache_dtype, device=device) for (_, layers), n in zip(groups, counts)]
        self.kv_cache = self.kv_caches[0]  # the only one without a sliding window
        for (_, layers), cache in zip(groups, self.kv_caches):
            for j, i in enumerate(layers):
                model.layers[i].self_attn.k_cache = cache[j, 0]
                model.layers[i].self_attn.v_cache = cache[j, 1]
        # Decode attention that reads the paged cache in place: our C++ kernel on a CPU,
        # flashinfer's on CUDA when it is installed; None: the PyTorch path (attention.py).
        if device.type == "cpu":
            kernel = paged_decode_kernel(num_threads)
        elif any(self.windows):  # flashinfer's kernel is not given the window: PyTorch path
            kernel = None
        else:
            kernel = flashinfer_decode_kernel(config.num_heads, config.num_kv_heads,
                                              config.head_dim, dtype, device)
        probe = torch.empty(1, config.num_heads, config.head_dim, dtype=dtype, device=device)
        ok = kernel is not None and kernel.supports(probe, self.kv_cache[0, 0])
        self.decode_kernel = kernel if ok else None
        self.generators: dict[str, torch.Generator] = {}

    @property
    def block_shape(self) -> tuple[int, ...]:
        """[layers, K/V, block_size, kv_heads, row]: the payload of one block."""
        shape = self.kv_cache.shape
        return (shape[0], shape[1], self.block_size, *shape[3:])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        for request_id in out.finished_request_ids:
            self.generators.pop(request_id, None)
        result.saved = [(save, self._copy_out(save)) for save in out.saves]
        for s in out.scheduled:
            self._load_blocks(s, result)
        computed = [s for s in out.scheduled
                    if s.num_new_tokens and s.request_id not in result.failed_loads]
        ids, pieces = self._forward_isolated(computed, result)
        for s in out.scheduled:
            if s.replay_logits is not None:  # an exact repeat: its first token from kept logits
                ids.append(s.request_id)
                pieces.append(s.replay_logits.to(self.device).unsqueeze(0))
        if ids:
            logits = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # [N, vocab]
            self._sample({s.request_id: s for s in out.scheduled}, ids, logits,
                         out.token_bitmasks, result)
        return result

    def _copy_out(self, save: BlockSave) -> torch.Tensor:
        return self._block(save.block_id).to("cpu", copy=True)

    def _load_blocks(self, s: ScheduledRequest, result: RunnerOutput) -> None:
        for load in s.loads:
            try:
                faults.check("load", s.request_id)
                block, payload = self._block(load.block_id), load.payload
                if payload.dtype != block.dtype or payload.numel() != block.numel():
                    raise ValueError(f"payload {payload.dtype} x {payload.numel()} does not fit "
                                     f"a {block.dtype} block of {block.numel()}")
                block.copy_(payload.reshape(block.shape))
            except Exception as exc:
                log.warning("request %s: a cached block could not be loaded (%r); its tokens "
                            "are computed instead", s.request_id, exc)
                result.failed_loads[s.request_id] = load.block_id
                return

    def _forward_isolated(self, batch: list[ScheduledRequest], result: RunnerOutput
                          ) -> tuple[list[str], list[torch.Tensor]]:
        """Logits of the sampled positions; a failing batch is retried a request at a time."""
        if not batch:
            return [], []
        try:
            ids, logits = self._forward(batch, result)
            return ids, [logits] if ids else []
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc, result)
                return [], []
            log.warning("a forward pass of %d requests failed; running them one at a time",
                        len(batch), exc_info=True)
        all_ids, pieces = [], []
        for s in batch:
            try:
                ids, logits = self._forward([s], result)
            except Exception as exc:
                self._fail(s, exc, result)
                continue
            if ids:
                all_ids += ids
                pieces.append(logits)
        return all_ids, pieces

    def _fail(self, s: ScheduledRequest, exc: Exception, result: RunnerOutput) -> None:
        log.error("the forward pass of request %s failed: %r", s.request_id, exc,
                  exc_info=exc)
        result.errors[s.request_id] = f"forward pass failed: {exc!r}"

    def _forward(self, batch: list[ScheduledRequest], result: RunnerOutput
                 ) -> tuple[list[str], torch.Tensor]:
        batch = sorted(batch, key=lambda s: s.num_new_tokens != 1)  # decodes first
        input_ids, positions, metas = prepare_inputs(batch, self.block_size, self.device,
                                                     self.decode_kernel, self.windows)
        hidden = self.model(input_ids, positions, metas)
        ends, ids, offset = [], [], 0
        for s in batch:
            if s.params.prompt_logprobs is not None and s.start < len(s.prompt_token_ids) - 1:
                result.prompt_logprobs[s.request_id] = self._prompt_logprobs(
                    s, hidden[offset : offset + s.num_new_tokens])
            offset += s.num_new_tokens
            if s.sample:
                ends.append(offset - 1)
                ids.append(s.request_id)
        if not ends:
            return [], hidden[:0]
        return ids, self.model.compute_logits(hidden[ends])  # [N, vocab]

    def _prompt_logprobs(self, s: ScheduledRequest, hidden: torch.Tensor
                         ) -> tuple[int, list[dict[int, float]]]:
        """Each prompt token this chunk predicts: its logprob and the top k, from the
        logits of the position before it (a few hundred rows of logits at a time)."""
        prompt, start = s.prompt_token_ids, s.start
        end = min(start + s.num_new_tokens, len(prompt) - 1)  # the last predicts no prompt token
        entries: list[dict[int, float]] = []
        for lo in range(start, end, PROMPT_LOGITS_ROWS):
            hi = min(lo + PROMPT_LOGITS_ROWS, end)
            logits = self.model.compute_logits(hidden[lo - start : hi - start]).float()
            entries += [top_logprobs(row, [prompt[p + 1]], s.params.prompt_logprobs)
                        for p, row in zip(range(lo, hi), logits)]
        return start + 1, entries

    def _sample(self, by_id: dict[str, ScheduledRequest], ids: list[str], logits: torch.Tensor,
                bitmasks: dict[str, Any], result: RunnerOutput) -> None:
        with one_thread():  # CPU threads only: on a GPU the ops below do not use them
            self._sample_rows(by_id, ids, logits, bitmasks, result)

    def _sample_rows(self, by_id: dict[str, ScheduledRequest], ids: list[str],
                     logits: torch.Tensor, bitmasks: dict[str, Any],
                     result: RunnerOutput) -> None:
        processed = self._processed(by_id, ids, logits, bitmasks, result)
        tokens = greedy_tokens(processed)
        for i, request_id in enumerate(ids):
            s = by_id[request_id]
            if request_id in result.errors:
                continue
            try:
                faults.check("sample", request_id)
                if not s.params.is_greedy:
                    tokens[i] = sample_row(processed[i], s.params, self._generator(s))
                if s.params.logprobs is not None:  # of the model's own distribution
                    result.logprobs[request_id] = top_logprobs(logits[i], [tokens[i]],
                                                               s.params.logprobs)
                if s.keep_logits:  # raw: a repeat applies its own penalties and grammar
                    result.kept_logits[request_id] = logits[i].to("cpu", copy=True)
                result.sampled[request_id] = tokens[i]
            except Exception as exc:
                log.exception("sampling for request %s failed", request_id)
                result.errors[request_id] = f"sampling failed: {exc!r}"

    def _processed(self, by_id: dict[str, ScheduledRequest], ids: list[str],
                   logits: torch.Tensor, bitmasks: dict[str, Any],
                   result: RunnerOutput) -> torch.Tensor:
        """The logits the sampler draws from: biases and penalties per row, then the grammar
        masks of the whole batch at once. The raw logits are left as they are."""
        penalized = [i for i, rid in enumerate(ids) if by_id[rid].params.processes_logits]
        masked = [i for i, rid in enumerate(ids) if rid in bitmasks]
        if not penalized and not masked:
            return logits
        out = logits.clone()
        for i in penalized:
            s = by_id[ids[i]]
            try:
                apply_penalties(out[i], s.params, s.prompt_token_ids, s.output_token_ids,
                                self.eos_token_ids)
            except Exception as exc:
                log.exception("penalties for request %s failed", s.request_id)
                result.errors[s.request_id] = f"sampling failed: {exc!r}"
        if masked:
            try:
                apply_token_bitmask(out, torch.stack([bitmasks[ids[i]] for i in masked]), masked)
            except Exception as exc:
                log.exception("applying grammar masks failed")
                for i in masked:
                    result.errors[ids[i]] = f"grammar mask failed: {exc!r}"
        return out

    def _generator(self, s: ScheduledRequest) -> Any:
        """A seeded request's own generator: its draws do not depend on the batch."""
        if s.params.seed is None:
            return None
        if s.request_id not in self.generators:
            self.generators[s.request_id] = make_generator(s.params.seed, self.device)
        return self.generators[s.request_id]

    def _block(self, block_id: int) -> torch.Tensor:
        """[layers, K/V, block_size, kv_heads, row] view of one block (one KV cache
        group: the tiers are off for a model with a sliding window)."""
        start = block_id * self.block_size
        return self.kv_cache[:, :, start : start + self.block_size]


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row (the first one at a tie, as torch's). On a CPU through NumPy,
    whose argmax is vectorized: 3 us a 49k-entry row, where torch's takes 36."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()
