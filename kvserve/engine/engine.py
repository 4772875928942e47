"""The engine: accept requests, and step them all forward together.

``step()`` is three beats: the scheduler picks the work, the runner computes it, the
scheduler records what came out. Everything else reads the state those beats leave.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import dataclass

import torch

import kvserve
from kvserve.cache.manager import KVCacheManager
from kvserve.cache.stats import cache_report
from kvserve.cache.tiers import DiskTier, HostTier
from kvserve.engine.output import RequestOutput, TextStream, make_output
from kvserve.engine.request import Request
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.model.llama import build_model
from kvserve.model.loader import Checkpoint, load_checkpoint
from kvserve.model.tokenizer import IncrementalDecoder
from kvserve.runner.model_runner import ModelRunner
from kvserve.sampling_params import SamplingParams

log = logging.getLogger("kvserve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a .gguf file or a Hugging Face directory; None = default model
    dtype: str = "float32"
    device: str = "auto"
    kv_cache_memory: int = 1 << 30  # bytes of K/V blocks
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # defaults to the model's context length
    num_threads: int | None = None  # CPU threads; default: all cores
    enable_prefix_caching: bool = True
    kv_host_memory: int | None = None  # host tier bytes; None: 4 GiB on a GPU, off on a CPU
    kv_disk_cache: str | None = None  # folder of the disk tier; None: off
    kv_disk_size: int = 10 << 30
    num_exact_repeats: int = 64  # prompts whose last logits are kept for exact repeats
    schedule_policy: str = "fcfs"  # or "lpm" (longest cached prefix first)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_cache_manager(config: EngineConfig, num_blocks: int, block_bytes: int,
                        fingerprint: str, dtype: torch.dtype,
                        device: torch.device) -> KVCacheManager:
    host_bytes = config.kv_host_memory
    if host_bytes is None:
        host_bytes = 4 << 30 if device.type == "cuda" else 0
    disk = None
    if config.kv_disk_cache:
        def decode(data: bytes) -> torch.Tensor:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)

        def encode(payload: torch.Tensor) -> bytes:
            return payload.contiguous().view(torch.uint8).numpy().tobytes()

        disk = DiskTier(config.kv_disk_cache, config.kv_disk_size, fingerprint, encode, decode)
    host = HostTier(host_bytes, spill=disk.put if disk else None) if host_bytes else None
    return KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                          fingerprint, block_bytes, host, disk, config.num_exact_repeats)


@functools.cache
def warn_openblas_spin() -> None:
    log.warning("kvserve: numpy was imported before kvserve, so OpenBLAS threads spin ~0.1 s "
                "after each call and slow a prompt that follows a decode step (float32 on a "
                "CPU); import kvserve first, or set OPENBLAS_THREAD_TIMEOUT=12")


class Engine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None) -> None:
        """``checkpoint``: already loaded weights to use instead of loading ``config.model``."""
        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        self.config = config
        self.device = resolve_device(config.device)
        dtype = DTYPES[config.dtype]
        num_threads = config.num_threads or os.cpu_count() or 1
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
            if dtype == torch.float32 and not kvserve.OPENBLAS_SPIN_CAPPED:
                warn_openblas_spin()
        checkpoint = checkpoint or load_checkpoint(config.model)
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.fingerprint = checkpoint.fingerprint
        self.max_model_len = min(config.max_model_len or checkpoint.config.max_position_embeddings,
                                 checkpoint.config.max_position_embeddings)
        self.kv_bytes_per_token = checkpoint.config.kv_bytes_per_token(config.dtype)
        self.block_bytes = self.kv_bytes_per_token * config.block_size
        num_blocks = config.kv_cache_memory // self.block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} B is less than one block "
                             f"({self.block_bytes} B); give it more memory")
        model = build_model(checkpoint.config, checkpoint.tensors, dtype, self.device,
                            self.max_model_len)
        self.kv = build_cache_manager(config, num_blocks, self.block_bytes, checkpoint.fingerprint,
                                      dtype, self.device)
        self.runner = ModelRunner(model, checkpoint.config, self.kv, dtype, self.device,
                                  num_threads)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.schedule_policy), self.kv)
        self.eos_ids = tuple(self.tokenizer.eos_token_ids)
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
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        decoder = IncrementalDecoder(self.tokenizer)
        self._streams[request.request_id] = (request, text, TextStream(decoder, params.stop))
        self.scheduler.add(request)
        return request

    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model context of {self.max_model_len} tokens; shorten the prompt or lower "
                f"max_tokens")
        # The last generated token is never fed back, so it needs no K/V.
        pool_tokens = self.kv.num_blocks * self.config.block_size
        if total - 1 > pool_tokens:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {total - 1} "
                f"KV slots but the KV pool holds {pool_tokens} tokens; raise kv_cache_memory or "
                f"lower max_tokens")

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        sampled = self.runner.execute(out)
        progressed = self.scheduler.update(out, sampled, self.eos_ids)
        return [self._output(r) for r in progressed]

    def _output(self, request: Request) -> RequestOutput:
        _, prompt, stream = self._streams[request.request_id]
        token = request.output_token_ids[-1]
        if stream.add(token, is_last=request.is_finished) and not request.is_finished:
            self.scheduler.finish(request, "stop")
        delta = stream.take(finished=request.is_finished)
        if request.is_finished:
            del self._streams[request.request_id]
        return make_output(request, prompt, stream, delta, self.kv_bytes_per_token)

    def abort(self, request_id: str) -> RequestOutput | None:
        entry = self._streams.pop(request_id, None)
        if entry is None:
            return None
        request, prompt, stream = entry
        self.scheduler.finish(request, "abort")
        return make_output(request, prompt, stream, stream.take(finished=True),
                           self.kv_bytes_per_token)

    def cache_stats(self) -> dict:
        return cache_report(self.kv)

    def clear_cache(self) -> int:
        """Drop every unreferenced cached block in every tier (never one in use)."""
        return self.kv.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.scheduler.running + list(self.scheduler.waiting))
