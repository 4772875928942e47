"""The C++ CPU kernels of csrc/ (paged decode attention, fused RMSNorm, rope fused with the
K/V cache write, silu(gate) * up, and a decode step's decoder layers in one call), compiled on
first use into one library and loaded with ctypes; the matmuls on GGUF quantized weights
(quant.py) are a second library, built the same way.

It needs only a C++ compiler (``$CXX``, default ``g++``); it is built for this machine's CPU
and cached under ``~/.cache/kvserve/kernels`` (``$KVSERVE_CACHE_DIR``). When there is no
compiler, or ``KVSERVE_CPU_KERNELS=0``, the kernel getters return None and the model uses its
PyTorch paths, which give the same results (tests/model/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kvserve.model.config import int8_row_width

log = logging.getLogger("kvserve")

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_attention.cpp", "rms_norm.cpp", "rope_cache.cpp",
                                    "silu_mul.cpp", "decode_layers.cpp")]
HEADERS = [CSRC / name for name in ("bf16.h", "kv_int8.h", "thread_pool.h", "vec_math.h")]
# -fassociative-math lets the compiler sum a dot product as a tree of vector adds. The kernel
# stays deterministic: one compiled order for every sequence, however the batch is made up.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-pthread"]
# The quantized matmuls get a library of their own, built without reassociation or FMA
# contraction: their tiles for one row and for many must compute each output identically.
QUANT_SOURCES = [CSRC / "quant_matmul.cpp"]
QUANT_HEADERS = [CSRC / name for name in ("bf16.h", "quant_blocks.h", "thread_pool.h")]
QUANT_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC",
               "-pthread"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
CACHE_CODES = {**DTYPE_CODES, torch.int8: 2}  # int8: rows with their scale (kv_quant.py)
HEAD_DIMS = (64, 128)


class PagedDecodeKernel:
    """Decode attention over the paged cache: one query token per sequence (attention.py)."""

    def __init__(self, lib: ctypes.CDLL, num_threads: int) -> None:
        self.fn = lib.kvserve_paged_decode
        c = ctypes
        self.fn.argtypes = [c.c_int, c.c_int, c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p,
                            c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p, c.c_int, c.c_int,
                            c.c_int, c.c_int, c.c_int, c.c_float, c.c_int, c.c_int]
        self.fn.restype = c.c_int
        self.num_threads = num_threads

    def supports(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype in DTYPE_CODES
                and k_cache.dtype in CACHE_CODES and q.shape[-1] in HEAD_DIMS
                and k_cache.shape[-1] == row_width(q.shape[-1], k_cache.dtype)
                and k_cache.is_contiguous() and q.stride(2) == 1
                and q.stride(1) == q.shape[-1])

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 scale: float, window: int = 0) -> torch.Tensor:
        """q [seqs, heads, head_dim] (heads contiguous); caches [slots, kv_heads, row] of
        float32, bfloat16 or int8 rows; block_tables [seqs, max_blocks] and context_lens
        [seqs] int64, contiguous, every length >= 1 -> [seqs, heads, head_dim].
        ``window`` > 0: each sequence attends only to its last ``window`` positions."""
        num_seqs, num_heads, head_dim = q.shape
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype)
        rc = self.fn(DTYPE_CODES[q.dtype], CACHE_CODES[k_cache.dtype], q.data_ptr(),
                     q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(),
                     out.data_ptr(), num_seqs, num_heads, k_cache.shape[1], head_dim,
                     block_size, scale, window, self.num_threads)
        if rc != 0:
            raise ValueError(f"paged decode kernel: unsupported shape q={tuple(q.shape)}, "
                             f"k_cache={tuple(k_cache.shape)}")
        return out


class RMSNormKernel:
    """``(x, residual) -> (norm(x + residual) * weight, x + residual)``, the sum written into
    ``residual`` in place; without a residual, ``(norm(x) * weight, x)``. Rows [N, dim]."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.fn = lib.kvserve_rms_norm
        c = ctypes
        self.fn.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64,
                            c.c_int64, c.c_float]
        self.fn.restype = c.c_int

    def supports(self, x: torch.Tensor, residual: torch.Tensor | None,
                 weight: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype in DTYPE_CODES and weight.dtype == x.dtype
                and x.is_contiguous() and weight.is_contiguous()
                and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype
                                          and residual.shape == x.shape)))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty_like(x)
        dim = x.shape[-1]
        self.fn(DTYPE_CODES[x.dtype], x.data_ptr(), 0 if residual is None else residual.data_ptr(),
                weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
        return out, (x if residual is None else residual)


class RopeCacheKernel:
    """The fused qkv projection [T, (heads + 2 kv_heads) * head_dim] -> rotated q [T, heads,
    head_dim] and k [T, kv_heads, head_dim]; k and v are also written to their cache slots
    (converted, or quantized to int8 rows, when the cache holds another dtype).
    cos/sin: float32 tables [positions, head_dim]; positions, slots: int64 [T]."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.fn = lib.kvserve_rope_cache
        c = ctypes
        self.fn.argtypes = [c.c_int, c.c_int, c.c_void_p, c.c_int64, c.c_int, c.c_int, c.c_int,
                            c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p,
                            c.c_void_p, c.c_void_p, c.c_void_p]
        self.fn.restype = c.c_int

    def supports(self, qkv: torch.Tensor, tables: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (qkv.device.type == "cpu" and qkv.dtype in DTYPE_CODES and qkv.is_contiguous()
                and tables.dtype == torch.float32 and tables.is_contiguous()
                and k_cache.dtype in CACHE_CODES and k_cache.is_contiguous())

    def __call__(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        tokens = qkv.shape[0]
        q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype)
        k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype)
        rc = self.fn(DTYPE_CODES[qkv.dtype], CACHE_CODES[k_cache.dtype], qkv.data_ptr(), tokens,
                     num_heads, num_kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                     positions.data_ptr(), slots.data_ptr(), q.data_ptr(), k.data_ptr(),
                     k_cache.data_ptr(), v_cache.data_ptr())
        if rc != 0:
            raise ValueError(f"rope kernel: unsupported head_dim {head_dim} or cache dtype")
        return q, k


class SiluMulKernel:
    """SwiGLU's activation: the gate/up projection [N, 2 n] -> silu(gate) * up [N, n]."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.fn = lib.kvserve_silu_mul
        c = ctypes
        self.fn.argtypes = [c.c_int, c.c_void_p, c.c_int64, c.c_int64, c.c_void_p]
        self.fn.restype = c.c_int

    def supports(self, gate_up: torch.Tensor) -> bool:
        return (gate_up.device.type == "cpu" and gate_up.dtype in DTYPE_CODES
                and gate_up.is_contiguous() and gate_up.shape[-1] % 2 == 0)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        n = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], n)
        self.fn(DTYPE_CODES[gate_up.dtype], gate_up.data_ptr(), gate_up.numel() // (2 * n), n,
                out.data_ptr())
        return out


class DecodeLayer(ctypes.Structure):
    """csrc/decode_layers.cpp's Layer: a layer's weights (norms as float tensors, projections
    as quant_matmul.cpp Weights) and its K/V cache."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_norm", "qkv", "o", "gate_up", "down", "k_cache", "v_cache")]


class DecodeStep(ctypes.Structure):
    """csrc/decode_layers.cpp's Step: what every layer of the call shares."""

    c = ctypes
    _fields_ = [("matmul", c.c_void_p), ("dtype", c.c_int), ("cache_dtype", c.c_int),
                ("tokens", c.c_int64), ("hidden", c.c_int), ("num_heads", c.c_int),
                ("num_kv_heads", c.c_int), ("head_dim", c.c_int), ("intermediate", c.c_int),
                ("eps", c.c_float), ("scale", c.c_float), ("window", c.c_int),
                ("block_size", c.c_int), ("matmul_threads", c.c_int),
                ("attention_threads", c.c_int), ("cos", c.c_void_p), ("sin", c.c_void_p),
                ("positions", c.c_void_p), ("slots", c.c_void_p), ("block_tables", c.c_void_p),
                ("table_stride", c.c_int64), ("context_lens", c.c_void_p)]
    del c


class DecodeLayersKernel:
    """All decoder layers of a decode step (one new token per sequence) in one call: the
    kernels the module path calls, in its order, so the results are the same bit for bit.
    ``matmul``: the address of kvserve_quant_matmul (the other library)."""

    def __init__(self, lib: ctypes.CDLL, matmul: int) -> None:
        self.fn = lib.kvserve_decode_layers
        c = ctypes
        self.fn.argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_void_p]
        self.fn.restype = c.c_int
        self.matmul = matmul

    def step(self, **fields: object) -> DecodeStep:
        """A DecodeStep with this library's matmul, for the fields that never change."""
        return DecodeStep(matmul=self.matmul, **fields)

    def __call__(self, step: DecodeStep, layers: ctypes.Array, residual: torch.Tensor,
                 x: torch.Tensor) -> None:
        """residual: the embeddings in, the residual stream out; x: the last MLP output."""
        rc = self.fn(ctypes.addressof(step), ctypes.addressof(layers), len(layers),
                     residual.data_ptr(), x.data_ptr())
        if rc != 0:
            raise ValueError(f"decode layers kernel: unsupported shape (head_dim "
                             f"{step.head_dim}, {step.num_heads} heads)")


def attention_reads_int8(head_dim: int) -> bool:
    """Whether the C++ attention kernel is here and reads int8 rows at this head_dim."""
    return head_dim in HEAD_DIMS and load_library() is not None


def row_width(head_dim: int, cache_dtype: torch.dtype) -> int:
    return int8_row_width(head_dim) if cache_dtype == torch.int8 else head_dim


@functools.cache
def load_library() -> ctypes.CDLL | None:
    return _load("paged_attention", "CPU attention kernel", SOURCES, HEADERS, FLAGS,
                 "CPU attention uses the slower PyTorch path")


@functools.cache
def load_quant_library() -> ctypes.CDLL | None:
    """The quantized matmuls (quant.py), or None: the model then dequantizes those weights."""
    lib = _load("quant_matmul", "quantized matmul kernel", QUANT_SOURCES, QUANT_HEADERS,
                QUANT_FLAGS, "quantized GGUF weights are dequantized to float")
    if lib is not None and not lib.kvserve_quant_available():
        log.warning("kvserve: this CPU lacks AVX2/FMA/F16C; quantized GGUF weights are "
                    "dequantized to float")
        return None
    return lib


def _load(name: str, what: str, sources: list[Path], headers: list[Path], flags: list[str],
          fallback: str) -> ctypes.CDLL | None:
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("kvserve: no C++ compiler (g++ or $CXX) found; %s. Install g++ for the "
                    "%s.", fallback, what)
        return None
    path = cache_dir() / f"{name}-{build_key(compiler, sources, headers, flags)}.so"
    if not path.exists():
        try:
            compile_library(compiler, path, sources, flags)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("kvserve: could not build the %s (%s); %s", what,
                        detail.strip()[:500], fallback)
            return None
    return ctypes.CDLL(str(path))


def paged_decode_kernel(num_threads: int) -> PagedDecodeKernel | None:
    lib = load_library()
    return None if lib is None else PagedDecodeKernel(lib, num_threads)


def rms_norm_kernel() -> RMSNormKernel | None:
    lib = load_library()
    return None if lib is None else RMSNormKernel(lib)


def rope_cache_kernel() -> RopeCacheKernel | None:
    lib = load_library()
    return None if lib is None else RopeCacheKernel(lib)


def silu_mul_kernel() -> SiluMulKernel | None:
    lib = load_library()
    return None if lib is None else SiluMulKernel(lib)


def decode_layers_kernel() -> DecodeLayersKernel | None:
    """None without both libraries: the layers then run one module at a time."""
    lib, quant = load_library(), load_quant_library()
    if lib is None or quant is None:
        return None
    return DecodeLayersKernel(lib, ctypes.cast(quant.kvserve_quant_matmul, ctypes.c_void_p).value)


def cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve"
    return Path(root) / "kernels"


def build_key(compiler: str, sources: list[Path], headers: list[Path],
              flags: list[str]) -> str:
    """The source, flags, compiler and CPU: -march=native code is only valid on its CPU."""
    h = hashlib.sha256(b"".join(f.read_bytes() for f in [*sources, *headers]))
    h.update(" ".join([compiler, *flags, platform.machine()]).encode())
    h.update(subprocess.run([compiler, "--version"], capture_output=True).stdout)
    try:
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith(("flags", "model name"))][:2]
        h.update("\n".join(flags).encode())
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()[:16]


def compile_library(compiler: str, path: Path, sources: list[Path], flags: list[str]) -> None:
    """Build into a temporary file and rename it: concurrent first runs never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, *map(str, sources)], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
