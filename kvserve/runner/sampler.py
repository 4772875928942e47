"""Turn each sequence's last logits into its next token."""

from __future__ import annotations

import torch

from kvserve.sampling_params import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-request generator makes seeded sampling independent of the rest of the batch."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample_row(logits: torch.Tensor, p: SamplingParams,
               generator: torch.Generator | None) -> int:
    """One token from a [vocab] row of logits (a greedy row is an argmax, done batched)."""
    return int(torch.multinomial(filtered_probs(logits, p), 1, generator=generator).item())


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[vocab] logits -> probabilities after temperature, top-k, top-p and min-p."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        drop[0] = False  # a top_p that rounds to 0 in float32 must not drop it too
        probs = probs.scatter(0, order[drop], 0.0)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def top_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> dict[int, float]:
    """The sampled token's logprob and the k most likely, from the model's raw [vocab] logits."""
    logprobs = torch.log_softmax(logits, dim=-1)
    out = {}
    if k:
        values, ids = logprobs.topk(k)
        out = dict(zip(ids.tolist(), values.tolist()))
    for token in tokens:
        out[token] = float(logprobs[token])
    return out
