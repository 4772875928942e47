"""transformers as the oracle for the same GGUF file, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve.model.loader import default_model_path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path):
    """transformers' tokenizer for the same GGUF file (its own GGUF converter)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="session")
def hf_oracle(gguf_path: Path):
    """transformers' LlamaForCausalLM on the same GGUF file in float32 (slow: ~15 s)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()
