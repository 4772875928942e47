"""What the KV cache is at start-up: the payload format of a block, how many blocks each KV
cache group gets out of ``--kv-cache-memory``, and the host/disk/remote tiers behind it."""

from __future__ import annotations

import dataclasses

import torch

from kvserve.cache.disk_tier import DiskTier
from kvserve.cache.remote_tier import RemoteTier
from kvserve.cache.tiers import HostTier, TierStore
from kvserve.config import EngineConfig
from kvserve.model.config import KV_GROUP, ModelConfig

KV_LAYOUT_VERSION = 1  # bump when the order of a block's payload changes


def resolve_kv_dtype(config: EngineConfig, model: ModelConfig, native_weights: bool,
                     int8_kernel: bool) -> EngineConfig:
    """``kv_cache_dtype`` auto, made concrete: int8 where the model computes on quantized GGUF
    blocks on a CPU and the C++ attention kernel reads int8 rows at its head_dim
    (``int8_kernel``), as llama.cpp users pick a q8_0 cache: 3.6x the tokens of float32 in
    the same memory, perplexity +0.2% on the default model (docs/BENCHMARKS.md). Elsewhere
    the activation dtype, the one lossless choice."""
    if config.kv_cache_dtype != "auto":
        return config
    int8 = native_weights and int8_kernel and model.head_dim % KV_GROUP == 0
    return dataclasses.replace(config, kv_cache_dtype="int8" if int8 else config.dtype)


def check_kv_dtype(config: EngineConfig, model: ModelConfig) -> None:
    """Refuse a KV dtype the model's shape cannot take: int8 scales groups of KV_GROUP."""
    if config.kv_dtype == "int8" and model.head_dim % KV_GROUP:
        raise ValueError(f"kv_cache_dtype int8 needs a head_dim that is a multiple of "
                         f"{KV_GROUP} (this model's is {model.head_dim}); use kv_cache_dtype "
                         f"auto")


def kv_format(config: EngineConfig, model: ModelConfig) -> str:
    """What a block's payload is: dtype and layout [layers, K/V, tokens, kv_heads, row].

    int8 names its scale layout; a cache dtype other than the activations' also names the
    activation dtype, since the K/V of either are computed differently and must not mix."""
    kv = config.kv_dtype
    shape = (model.num_layers, 2, config.block_size, model.num_kv_heads,
             model.kv_row_width(kv))
    name = "int8+bf16-absmax-scale-per-16+hadamard-k" if kv == "int8" else kv
    if kv != config.dtype:
        name += f"@{config.dtype}"
    return f"{name};v{KV_LAYOUT_VERSION};{'x'.join(map(str, shape))}"


def group_block_counts(config: EngineConfig, windows: tuple[int, ...],
                       block_bytes: list[int]) -> list[int]:
    """Blocks of each KV cache group out of ``config.kv_cache_memory``.

    One group: as many blocks as fit. Several: first as many blocks in every group as fit
    (what full attention would have), then each sliding group is cut to what max_num_seqs
    windows and one step's chunk can use, and what that frees goes to the full group."""
    memory = config.kv_cache_memory
    if len(windows) == 1:
        return [memory // block_bytes[0]]
    even = memory // sum(block_bytes)
    bs = config.block_size
    counts = [min(even, config.max_num_seqs * (-(-window // bs) + 1)
                  + -(-config.max_num_batched_tokens // bs)) if window else even
              for window in windows]
    if windows[0] == 0:  # the full group takes what the sliding ones leave
        rest = memory - sum(n * b for n, b in zip(counts[1:], block_bytes[1:]))
        counts[0] = rest // block_bytes[0]
    return counts


def build_tiers(config: EngineConfig, fingerprint: str, kv_fmt: str, block_bytes: int,
                dtype: torch.dtype, device: torch.device) -> TierStore:
    host_bytes = config.kv_host_memory
    if host_bytes is None:
        host_bytes = 4 << 30 if device.type == "cuda" else 0

    def decode(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)

    def encode(payload: torch.Tensor) -> bytes:
        return payload.contiguous().view(torch.uint8).numpy().tobytes()

    disk = None
    if config.kv_disk_cache:
        disk = DiskTier(config.kv_disk_cache, config.kv_disk_size, fingerprint, encode, decode,
                        kv_fmt, block_bytes)
    remote = None
    if config.kv_remote:
        remote = RemoteTier(config.kv_remote, fingerprint, encode, decode, kv_fmt, block_bytes,
                            config.kv_remote_ttl)
    host = HostTier(host_bytes) if host_bytes else None
    return TierStore(host, disk, block_bytes, remote)
