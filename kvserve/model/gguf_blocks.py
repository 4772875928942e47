"""GGUF tensors in their block formats: ``QuantTensor``, and numpy dequantizers to float32.

A ``QuantTensor`` keeps a [rows, cols] weight as ggml's blocks, one row of blocks per row
(``data``: uint8 [rows, row_bytes], usually a view into the memory-mapped file), for the
native matmuls of quant.py; ``dequantize`` gives the float32 weights the "none" path uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType
# The block types csrc/quant_matmul.cpp computes on; others are dequantized at load.
NATIVE_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K})


@dataclass(frozen=True, eq=False)
class QuantTensor:
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, row_bytes]
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], the same values as loading with quantization "none"."""
        return torch.from_numpy(dequantize(self.data.reshape(-1), self.qtype).reshape(self.shape))


def row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return cols // block_size * type_size


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Float32 weights, flat.

    Plain numpy on purpose: single-threaded, it stays fast when another process holds a core,
    where torch's OpenMP threads slow down 10-30x on a 2-core machine.
    """
    if qtype == GGMLQuantizationType.Q4_1:
        return _dequantize_q4_1(raw)
    if qtype == GGMLQuantizationType.Q8_0:
        return _dequantize_q8_0(raw)
    if qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32).copy()
    return gguf_dequantize(raw, qtype)


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Blocks of 32 weights: f16 scale d, then 32 int8 q; w = d * q."""
    blocks = raw.reshape(-1, 34)  # (num_blocks, 2 + 32 bytes)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (num_blocks, 1)
    weights = blocks[:, 2:].view(np.int8).astype(np.float32)  # (num_blocks, 32)
    weights *= scale
    return weights


def _dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Blocks of 32 weights: f16 scale d, f16 min m, 16 bytes of nibbles; w = d * q + m.

    Low nibbles hold weights 0..15 of the block, high nibbles weights 16..31.
    """
    blocks = raw.reshape(-1, 20)  # (num_blocks, 4 + 16 bytes)
    scale_min = blocks[:, :4].copy().view(np.float16).astype(np.float32)  # (num_blocks, 2)
    quants = np.empty((len(blocks), 32), dtype=np.uint8)
    np.bitwise_and(blocks[:, 4:], 0x0F, out=quants[:, :16])
    np.right_shift(blocks[:, 4:], 4, out=quants[:, 16:])
    weights = quants.astype(np.float32)  # (num_blocks, 32)
    weights *= scale_min[:, :1]
    weights += scale_min[:, 1:]
    return weights
