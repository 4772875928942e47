"""kvserve: an LLM inference engine and server built around the KV cache."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from kvserve.sampling_params import SamplingParams  # imports no numpy

# numpy's OpenBLAS runs float32 single-row matmuls on the CPU (model/llama.py). By default its
# threads busy-wait ~0.1 s after each call, holding the cores that the next oneDNN matmul
# needs: a prefill right after a decode took 154 ms instead of 97. 2^12 cycles is enough
# between the matmuls of one step. Read once, when OpenBLAS loads: import kvserve first.
OPENBLAS_SPIN_CAPPED = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from kvserve.engine.llm import LLM


def __getattr__(name: str):
    # LLM pulls in torch; importing it lazily keeps `import kvserve` (and the cache tests) light.
    if name == "LLM":
        from kvserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
