"""Turn each sequence's last logits into its next token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kvserve.sampling_params import SamplingParams


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Sampling on one CPU thread. Its ops on a vocabulary-wide row are too small to gain from
    a second thread, and every parallel op leaves torch's OpenMP workers spinning for a while
    after it, on the cores the next step's matmul threads need: on two cores a sampled token
    took 28 ms instead of 24 (a greedy one, 24)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-request generator makes seeded sampling independent of the rest of the batch."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample_row(logits: torch.Tensor, p: SamplingParams,
               generator: torch.Generator | None) -> int:
    """One token from a [vocab] row of logits (a greedy row is an argmax, done batched).

    By the inverse of the cumulative distribution at one uniform draw: one random number per
    token, where torch.multinomial draws one per vocabulary entry (1.7 ms of a 29 ms token
    for a 49k vocabulary). A token of probability 0 is never drawn."""
    cdf = filtered_probs(logits, p).double().cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator, device=cdf.device)
    return int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=len(cdf) - 1))


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


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Grammar masks, in place: ``logits[rows[j]]`` keeps only the tokens whose bit is set in
    ``bitmask[j]`` ([len(rows), ceil(vocab / 32)] int32, bit i of word w is token 32 w + i);
    every other token gets -inf. The bits are unpacked for the whole batch at once."""
    vocab = logits.shape[-1]
    bits = np.unpackbits(bitmask.cpu().numpy().view(np.uint8), axis=1, bitorder="little")
    if bits.shape[1] < vocab:  # tokens past the grammar's vocabulary are never allowed
        bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
    refused = torch.from_numpy(bits[:, :vocab]).view(torch.bool).logical_not_()
    refused = refused.to(logits.device)
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(refused, float("-inf"))
        return
    for j, row in enumerate(rows):
        logits[row].masked_fill_(refused[j], float("-inf"))


def apply_penalties(logits: torch.Tensor, p: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int], eos_ids: Sequence[int]) -> None:
    """One [vocab] row in place, in vLLM's order: logit bias, min_tokens, then repetition
    (transformers' definition, over prompt and output), frequency and presence (OpenAI's,
    over the output)."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype,
                            device=logits.device)
        logits.index_add_(0, ids, bias)
    if len(output_ids) < p.min_tokens:
        stops = [*eos_ids, *p.stop_token_ids]
        if stops:
            logits[torch.tensor(stops, device=logits.device)] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor([*prompt_ids, *output_ids], device=logits.device).unique()
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * p.repetition_penalty,
                                   score / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and len(output_ids):
        counts = torch.bincount(torch.tensor(list(output_ids), device=logits.device),
                                minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
