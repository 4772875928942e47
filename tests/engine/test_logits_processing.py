"""The sampler's logits processing against transformers' logits processors (the oracle), and
the grammar bitmask against a plain loop: no model, milliseconds."""

import pytest
import torch

from kvserve.runner.sampler import (
    apply_penalties,
    apply_token_bitmask,
    make_generator,
    one_thread,
    sample_row,
)
from kvserve.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
VOCAB = 49152
EOS = (2,)


def logits_and_history(seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=gen) * 4
    prompt = torch.randint(0, VOCAB, (30,), generator=gen).tolist()
    output = torch.randint(0, 200, (40,), generator=gen).tolist()  # repeats on purpose
    return logits, prompt, output


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits, prompt, output = logits_and_history(0)
    ours = logits.clone()
    apply_penalties(ours, SamplingParams(repetition_penalty=penalty), prompt, output, EOS)
    oracle = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    want = oracle(torch.tensor([prompt + output]), logits.clone().unsqueeze(0))[0]
    assert torch.equal(ours, want)


def test_logit_bias_matches_transformers_sequence_bias():
    logits, prompt, output = logits_and_history(1)
    bias = {5: 3.5, 1000: -100.0, 49151: 7.25}
    ours = logits.clone()
    apply_penalties(ours, SamplingParams(logit_bias=bias), prompt, output, EOS)
    oracle = transformers.SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})
    want = oracle(torch.tensor([prompt + output]), logits.clone().unsqueeze(0))[0]
    assert torch.equal(ours, want)


def test_min_tokens_matches_transformers_min_new_tokens():
    logits, prompt, output = logits_and_history(2)
    params = SamplingParams(max_tokens=64, min_tokens=50, stop_token_ids=(7,))
    ours = logits.clone()
    apply_penalties(ours, params, prompt, output, EOS)
    oracle = transformers.MinNewTokensLengthLogitsProcessor(len(prompt), 50, [2, 7])
    want = oracle(torch.tensor([prompt + output]), logits.clone().unsqueeze(0))[0]
    assert torch.equal(ours, want)
    done = logits.clone()  # past min_tokens nothing changes
    apply_penalties(done, SamplingParams(max_tokens=64, min_tokens=40), prompt, output, EOS)
    assert torch.equal(done, logits)


def test_frequency_and_presence_penalties_follow_openai_definition():
    logits, prompt, output = logits_and_history(3)
    ours = logits.clone()
    apply_penalties(ours, SamplingParams(frequency_penalty=0.75, presence_penalty=-0.5),
                    prompt, output, EOS)
    want = logits.clone()
    for token in set(output):  # OpenAI: mu - c * alpha_frequency - (c > 0) * alpha_presence
        want[token] -= output.count(token) * 0.75 + 1 * -0.5
    assert torch.allclose(ours, want, atol=1e-6)
    assert torch.equal(ours[1000:], logits[1000:])  # prompt tokens are not penalized


def test_all_together_in_vllm_order_match_the_chained_oracles():
    logits, prompt, output = logits_and_history(4)
    params = SamplingParams(max_tokens=64, min_tokens=45, repetition_penalty=1.2,
                            logit_bias={9: 2.0}, frequency_penalty=0.3)
    ours = logits.clone()
    apply_penalties(ours, params, prompt, output, EOS)
    ids = torch.tensor([prompt + output])
    want = logits.clone().unsqueeze(0)
    for oracle in (transformers.SequenceBiasLogitsProcessor({(9,): 2.0}),
                   transformers.MinNewTokensLengthLogitsProcessor(len(prompt), 45, [2]),
                   transformers.RepetitionPenaltyLogitsProcessor(1.2)):
        want = oracle(ids, want)
    want = want[0]
    for token in set(output):
        want[token] -= output.count(token) * 0.3
    assert torch.allclose(ours, want, atol=1e-6)


def test_token_bitmask_keeps_exactly_the_allowed_tokens_of_each_row():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 100, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 4), generator=gen, dtype=torch.int32)
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask, [2, 0])  # logits rows 2 and 0; row 1 unconstrained
    for row, bits in ((2, bitmask[0]), (0, bitmask[1])):
        for token in range(100):
            allowed = (int(bits[token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else float("-inf"))
    assert torch.equal(masked[1], logits[1])
    whole = logits[1:].clone()  # every row masked: one operation for the batch
    apply_token_bitmask(whole, bitmask.flip(0), [0, 1])
    assert torch.equal(whole[1], masked[2])


def test_sample_row_draws_each_token_at_its_probability():
    """One uniform draw per token through the cumulative distribution: frequencies follow
    the probabilities, a token of probability 0 (here cut by top_k) is never drawn, a seed
    repeats its tokens, and sampling leaves torch's thread count as it found it."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp(min=1e-30).log()
    params = SamplingParams(max_tokens=1, temperature=1.0, top_k=4)
    g = make_generator(7, torch.device("cpu"))
    threads = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
        draws = [sample_row(logits, params, g) for _ in range(20_000)]
    assert torch.get_num_threads() == threads
    counts = torch.bincount(torch.tensor(draws), minlength=5).double() / len(draws)
    assert counts[4] == 0
    assert torch.allclose(counts, probs.double(), atol=0.012), counts
    again = make_generator(7, torch.device("cpu"))
    assert [sample_row(logits, params, again) for _ in range(50)] == draws[:50]
