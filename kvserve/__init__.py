"""kvserve: an LLM inference engine and server built around the KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvserve.sampling_params import SamplingParams

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
