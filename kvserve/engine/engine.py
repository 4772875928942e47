"""The engine: accept requests, and step them all forward together.

``step()`` is three beats: the scheduler picks the work, the runner computes it, the
scheduler applies what came back. The engine then decides which requests are finished (one
place: ``finish_reason``) and hands out their text. A failure at any beat ends only the
request that caused it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os

import torch

import kvserve
from kvserve import faults
from kvserve.cache.manager import KVCacheManager
from kvserve.cache.stats import cache_report
from kvserve.cache.tiers import TierStore
from kvserve.config import EngineConfig
from kvserve.engine.kv_setup import (
    build_tiers,
    check_kv_dtype,
    group_block_counts,
    kv_format,
    resolve_kv_dtype,
)
from kvserve.engine.output import RequestOutput, TextStream, finish_reason, make_output
from kvserve.engine.request import Request
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.stats import EngineStats
from kvserve.model.cpu_kernels import attention_reads_int8
from kvserve.model.kv_quant import KV_DTYPES
from kvserve.model.loader import Checkpoint, load_checkpoint
from kvserve.model.quant import quantized_nbytes, resolve_quantization
from kvserve.model.registry import build_model
from kvserve.model.tokenizer import IncrementalDecoder
from kvserve.runner.model_runner import ModelRunner
from kvserve.sampling_params import SamplingParams
from kvserve.step import RunnerOutput, SchedulerOutput
from kvserve.structured.grammar import GrammarCompiler
from kvserve.units import format_size

log = logging.getLogger("kvserve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def warn_openblas_spin() -> None:
    log.warning("kvserve: numpy was imported before kvserve, so OpenBLAS threads spin ~0.1 s "
                "after each call and slow a prompt that follows a decode step (float32 on a "
                "CPU); import kvserve first, or set OPENBLAS_THREAD_TIMEOUT=12")


class Engine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None) -> None:
        """``checkpoint``: already loaded weights to use instead of loading ``config.model``."""
        self.config = config
        self.device = resolve_device(config.device)
        if config.kv_dtype == "int8" and self.device.type != "cpu":
            raise ValueError(f"kv_cache_dtype int8 runs on a CPU only (flashinfer has no int8 "
                             f"KV path); on {self.device.type} use kv_cache_dtype auto, bfloat16 "
                             f"or float16")
        dtype = DTYPES[config.dtype]
        num_threads = config.num_threads or os.cpu_count() or 1
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
            if dtype == torch.float32 and not kvserve.OPENBLAS_SPIN_CAPPED:
                warn_openblas_spin()
        checkpoint = checkpoint or load_checkpoint(
            config.model, resolve_quantization(config.quantization, self.device))
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.fingerprint = checkpoint.fingerprint
        self.max_model_len = min(config.max_model_len or checkpoint.config.max_position_embeddings,
                                 checkpoint.config.max_position_embeddings)
        model = build_model(checkpoint.config, checkpoint.tensors, dtype, self.device,
                            self.max_model_len)
        num_quantized = quantized_nbytes(model)
        self.weights = (f"native GGUF blocks ({format_size(num_quantized)})"
                        if num_quantized else config.dtype)
        self.config = config = resolve_kv_dtype(  # native blocks exist on a CPU only
            config, checkpoint.config, num_quantized > 0,
            attention_reads_int8(checkpoint.config.head_dim))
        check_kv_dtype(config, checkpoint.config)
        self.kv_bytes_per_token = checkpoint.config.kv_bytes_per_token(config.kv_dtype)
        self.block_bytes = self.kv_bytes_per_token * config.block_size
        groups = checkpoint.config.kv_groups()
        self.windows = tuple(window for window, _ in groups)
        layer_block = (checkpoint.config.kv_bytes_per_layer_token(config.kv_dtype)
                       * config.block_size)
        self.group_block_bytes = [len(layers) * layer_block for _, layers in groups]
        num_blocks = group_block_counts(config, self.windows, self.group_block_bytes)
        if min(num_blocks) < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} B is less than one block "
                             f"({self.block_bytes} B); give it more memory")
        fmt = kv_format(config, checkpoint.config)
        if any(self.windows):
            tiers = TierStore()
            if config.kv_host_memory or config.kv_disk_cache or config.kv_remote:
                log.warning("kvserve: the host/disk/remote KV tiers are off for a model with "
                            "sliding windows (blocks are kept per layer group on the device)")
        else:
            tiers = build_tiers(config, checkpoint.fingerprint, fmt, self.block_bytes,
                                KV_DTYPES[config.kv_dtype], self.device)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 checkpoint.fingerprint, self.group_block_bytes, tiers,
                                 config.num_exact_repeats, fmt, windows=self.windows)
        self.eos_ids = tuple(self.tokenizer.eos_token_ids)
        self.runner = ModelRunner(model, checkpoint.config, num_blocks, config.block_size,
                                  dtype, self.device, num_threads, self.eos_ids,
                                  config.kv_dtype)
        self.grammars = GrammarCompiler(self.tokenizer, checkpoint.config.vocab_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.schedule_policy), self.kv)
        self._streams: dict[str, tuple[Request, str | None, TextStream]] = {}
        self._ids = itertools.count()

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, prompt_text: str | None = None) -> Request:
        """Validate and queue a request; raises ValueError (nothing queued) if it cannot run.

        ``prompt_text``: the text of a prompt given as ids, reported back in its output."""
        text = prompt if isinstance(prompt, str) else prompt_text
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_fits(ids, params)
        request = Request(request_id or f"req-{next(self._ids)}", ids, params)
        if params.structured_outputs is not None:  # compiled already if the server saw it
            request.grammar = self.grammars.matcher(params.structured_outputs)
        self.scheduler.add(request)
        decoder = IncrementalDecoder(self.tokenizer)
        self._streams[request.request_id] = (request, text, TextStream(decoder, params.stop))
        return request

    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model context of {self.max_model_len} tokens; shorten the prompt or lower "
                f"max_tokens")
        # The last generated token is never fed back, so it needs no K/V; a sliding group
        # holds its window and one step's tokens at most.
        bs = self.config.block_size
        for pool, window in zip(self.kv.pools, self.windows):
            needed = total - 1
            if window:
                needed = min(needed, window + bs + self.config.max_num_batched_tokens)
            if needed > pool.num_blocks * bs:
                raise ValueError(
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                    f"{needed} KV slots but the KV pool holds {pool.num_blocks * bs} tokens; "
                    f"raise kv_cache_memory or lower max_tokens")

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        failed = self._fill_token_bitmasks(out)
        result = self._execute(out)
        result.errors.update(failed)
        outputs = [self._output(r) for r in self.scheduler.update(out, result)]
        if not self.scheduler.has_unfinished() and self.kv.saves:
            self._save_blocks()
        return outputs

    def _fill_token_bitmasks(self, out: SchedulerOutput) -> dict[str, str]:
        """Each constrained request that samples this step gets its grammar's allowed
        tokens, one row of a step-wide bitmask; returns the requests whose grammar failed."""
        rows = [(s.request_id, self.scheduler.requests[s.request_id].grammar)
                for s in out.scheduled if s.sample]
        rows = [(request_id, grammar) for request_id, grammar in rows if grammar is not None]
        if not rows:
            return {}
        words = (self.model_config.vocab_size + 31) // 32
        bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
        failed = {}
        for i, (request_id, grammar) in enumerate(rows):
            try:
                faults.check("grammar", request_id)
                grammar.fill(bitmask, i)
                out.token_bitmasks[request_id] = bitmask[i]
            except Exception as exc:
                log.exception("the grammar of request %s failed", request_id)
                failed[request_id] = f"grammar failed: {exc!r}"
        return failed

    def _save_blocks(self) -> None:
        """Going idle: copy the blocks the last step committed out to the remote tier now,
        so other replicas can use them without waiting for this one's next request."""
        out = SchedulerOutput(saves=self.scheduler.take_saves())
        self.scheduler.store_saved(self._execute(out))

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        """The runner keeps failures with their requests; should it still raise, run the
        step's requests one at a time, so only the one that raises again fails."""
        try:
            return self.runner.execute(out)
        except Exception:
            if len(out.scheduled) < 2:
                log.exception("a step failed")
            else:
                log.exception("a step of %d requests failed; running them one at a time",
                              len(out.scheduled))
        result = RunnerOutput()
        for i, s in enumerate(out.scheduled):
            first = i == 0  # the step's block saves and dropped ids go with the first part
            part = SchedulerOutput([s], out.saves if first else [],
                                   out.finished_request_ids if first else [],
                                   {k: v for k, v in out.token_bitmasks.items()
                                    if k == s.request_id})
            try:
                result.merge(self.runner.execute(part))
            except Exception as exc:
                result.errors[s.request_id] = f"step failed: {exc!r}"
        return result

    def _output(self, request: Request) -> RequestOutput:
        """Detokenize the new token, decide whether the request is finished, report it."""
        _, prompt, stream = self._streams[request.request_id]
        if not request.is_finished:
            try:
                faults.check("detokenize", request.request_id)
                if request.grammar is not None:
                    request.grammar.sync(request.output_token_ids)
                reason = finish_reason(request, stream, self.eos_ids)
            except Exception as exc:
                log.exception("the output of request %s failed", request.request_id)
                reason = "error"
                request.error = f"output failed: {exc!r}"
            if reason is not None:
                self.scheduler.finish(request, reason, request.error)
        delta = stream.take(finished=request.is_finished)
        if request.is_finished:
            del self._streams[request.request_id]
        return make_output(request, prompt, stream, delta)

    def abort(self, request_id: str) -> RequestOutput | None:
        entry = self._streams.pop(request_id, None)
        if entry is None:
            return None
        request, prompt, stream = entry
        self.scheduler.finish(request, "abort")
        return make_output(request, prompt, stream, stream.take(finished=True))

    def stats(self) -> EngineStats:
        kv, scheduler = self.kv, self.scheduler
        pool = kv.pool  # with several KV cache groups: the first (full attention)
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_blocks=pool.num_blocks, num_free_blocks=pool.num_free,
            num_used_blocks=pool.num_used, num_cached_blocks=pool.num_cached,
            peak_used_blocks=pool.peak_used, block_size=kv.block_size,
            block_bytes=self.block_bytes, kv_bytes_per_token=self.kv_bytes_per_token,
            scheduler=dataclasses.replace(scheduler.stats),
            kv_bytes_total=kv.bytes_total, kv_bytes_used=kv.bytes_in_use,
            kv_bytes_peak=sum(p.peak_used * b for p, b in zip(kv.pools, kv.group_block_bytes)))

    def reset_peak_usage(self) -> None:
        for pool in self.kv.pools:
            pool.peak_used = pool.num_used

    def cache_stats(self) -> dict:
        return cache_report(self.kv)

    def remote_tier_report(self) -> dict | None:
        """The remote tier's figures (safe from any thread), or None without one."""
        remote = self.kv.tiers.remote
        return None if remote is None else remote.report()

    def clear_cache(self) -> int:
        """Drop every unreferenced cached block in every tier (never one in use)."""
        return self.kv.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.scheduler.running + list(self.scheduler.waiting))

    def close(self) -> None:
        """Write the disk tier's queued blocks; after this it takes no more (reads still work)."""
        self.kv.close()
