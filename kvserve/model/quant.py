"""Compute on GGUF quantized weights in their block formats, on the CPU.

``QuantLinear`` and ``QuantEmbedding`` hold QuantTensors (the file's blocks, one copy, mostly
memory-mapped) instead of float weights; the matmul is csrc/quant_matmul.cpp, which quantizes
each activation row to 8 bits and takes integer dot products per block of 32, the same way for
one row or many (batch-invariant). build_model (llama.py) swaps these in for the Linear and
Embedding modules whose checkpoint weights are QuantTensors.
"""

from __future__ import annotations

import ctypes

import torch
from gguf import GGMLQuantizationType
from torch import nn

from kvserve.model.cpu_kernels import load_quant_library
from kvserve.model.gguf_blocks import NATIVE_TYPES, QuantTensor

QUANTIZATIONS = ("auto", "none", "gguf")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """``auto``: "gguf" (native quantized weights) on a CPU, "none" (dequantized) elsewhere."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "auto":
        return "gguf" if device.type == "cpu" else "none"
    return quantization


def native_types() -> frozenset[GGMLQuantizationType]:
    """The block types this machine computes on natively: none without the kernel library."""
    return NATIVE_TYPES if quant_kernel() is not None else frozenset()


class _Weight(ctypes.Structure):
    """csrc/quant_matmul.cpp's Weight: row blocks stacked, each in its own type."""

    _fields_ = [("k", ctypes.c_int64), ("num_parts", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)),
                ("weights", ctypes.POINTER(ctypes.c_void_p)),
                ("rows", ctypes.POINTER(ctypes.c_int64))]


class QuantKernel:
    """ctypes front of csrc/quant_matmul.cpp."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        c = ctypes
        self.check_fn = lib.kvserve_quant_check
        self.check_fn.argtypes = [c.c_void_p]
        self.check_fn.restype = c.c_int
        self.matmul_fn = lib.kvserve_quant_matmul
        self.matmul_fn.argtypes = [c.c_void_p, c.c_int, c.c_void_p, c.c_int64, c.c_void_p,
                                   c.c_int]
        self.matmul_fn.restype = None
        self.rows_fn = lib.kvserve_quant_dequantize_rows
        self.rows_fn.argtypes = [c.c_int, c.c_void_p, c.c_int64, c.c_void_p, c.c_int64,
                                 c.c_void_p]
        self.rows_fn.restype = c.c_int

    def dequantize_rows(self, weight: QuantTensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64 [n]) of ``weight`` as float32 [n, cols]: gguf's dequantized
        values exactly."""
        ids = ids.contiguous()
        out = torch.empty(ids.numel(), weight.cols, dtype=torch.float32)
        rc = self.rows_fn(int(weight.qtype), weight.data.ctypes.data, weight.cols,
                          ids.data_ptr(), ids.numel(), out.data_ptr())
        if rc != 0:
            raise ValueError(f"no native kernel for {weight.qtype.name} with {weight.cols} cols")
        return out


def quant_kernel() -> QuantKernel | None:
    lib = load_quant_library()
    return None if lib is None else QuantKernel(lib)


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W [out, in] as quantized blocks: ``parts`` stacked by rows, each
    in its own type (a fused qkv or gate/up projection whose parts differ, as in Q4_K_M files).

    x: float32 or bfloat16 [T, in]; y has x's dtype. Every output element is computed the same
    way whatever T and the thread count, so a row's result never depends on its batch.
    """

    def __init__(self, parts: list[QuantTensor], kernel: QuantKernel, bias: bool = False) -> None:
        super().__init__()
        if len({p.cols for p in parts}) != 1:
            raise ValueError("the parts of a QuantLinear must share their number of columns")
        self.parts = parts
        self.kernel = kernel
        self.in_features = parts[0].cols
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        n = len(parts)
        self._types = (ctypes.c_int * n)(*(int(p.qtype) for p in parts))
        self._ptrs = (ctypes.c_void_p * n)(*(p.data.ctypes.data for p in parts))
        self._rows = (ctypes.c_int64 * n)(*(p.shape[0] for p in parts))
        self._weight = _Weight(self.in_features, n, self._types, self._ptrs, self._rows)
        self.weight_address = ctypes.addressof(self._weight)  # also for csrc/decode_layers.cpp
        if kernel.check_fn(self.weight_address) != 0:
            types = [p.qtype.name for p in parts]
            raise ValueError(f"no native kernel for {types} with {self.in_features} columns")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = _DTYPE_CODES.get(x.dtype)
        if code is None or not x.is_contiguous():  # float16 and others: compute in float32
            return self.forward(x.float().contiguous()).to(x.dtype)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        self.kernel.matmul_fn(self.weight_address, code, x.data_ptr(),
                              x.numel() // self.in_features, y.data_ptr(),
                              torch.get_num_threads())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        types = "+".join(p.qtype.name for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, {types}"


class QuantEmbedding(nn.Module):
    """Token embeddings looked up in a quantized [vocab, hidden] table: only the looked-up rows
    are dequantized, to ``dtype``, with gguf's values."""

    def __init__(self, weight: QuantTensor, kernel: QuantKernel, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_blocks = weight
        self.kernel = kernel
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.kernel.dequantize_rows(self.weight_blocks, input_ids.reshape(-1))
        return rows.to(self.dtype).reshape(*input_ids.shape, self.weight_blocks.cols)


def stack_rows(weights: list[torch.Tensor | QuantTensor]) -> torch.Tensor | list[QuantTensor]:
    """Weights stacked by rows, for a fused projection: a tensor, or the QuantTensor parts.
    A mix of float and quantized weights is dequantized."""
    if all(isinstance(w, QuantTensor) for w in weights):
        return weights  # type: ignore[return-value]
    return torch.cat([dequantized(w) for w in weights])


def dequantized(weight: torch.Tensor | QuantTensor | list[QuantTensor]) -> torch.Tensor:
    if isinstance(weight, QuantTensor):
        return weight.dequantize()
    if isinstance(weight, list):
        return torch.cat([w.dequantize() for w in weight])
    return weight


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of quantized blocks the model computes on (a tied table counted once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        blocks = (module.parts if isinstance(module, QuantLinear)
                  else [module.weight_blocks] if isinstance(module, QuantEmbedding) else [])
        for b in blocks:
            seen[id(b.data)] = b.nbytes
    return sum(seen.values())

