"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

import dataclasses

import pytest


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
