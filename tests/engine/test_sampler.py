"""The sampler: greedy, batch-invariant seeded sampling, top-k/top-p/min-p support, the distribution it
draws from, penalties against a hand computation, and logprobs."""

from __future__ import annotations

import math

import torch

from engine.sampler import SamplingMetadata, apply_penalties, bits_to_uniforms, random_uniforms, sample
from engine.sampling_params import SamplingParams

VOCAB = 50


def _metadata(params: list[SamplingParams], seeds: list[int] | None = None, positions: list[int] | None = None,
              token_ids: list[list[int]] | None = None, num_prompt: list[int] | None = None
              ) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.from_params(
        params, seeds if seeds is not None else list(range(n)), positions if positions is not None else [7] * n,
        token_ids if token_ids is not None else [[1, 2]] * n, num_prompt if num_prompt is not None else [2] * n,
        VOCAB, "cpu")


def _logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    token_ids, logprobs = sample(logits, _metadata([SamplingParams(temperature=0.0)] * 8))
    assert torch.equal(token_ids, logits.argmax(dim=-1))
    assert logprobs is None


def test_seeded_row_is_batch_invariant() -> None:
    logits = _logits(16, seed=1)
    params = [SamplingParams(temperature=0.8 + 0.05 * i, top_p=0.9 if i % 2 else 1.0, top_k=10 * (i % 3),
                             min_p=0.05 * (i % 4 == 0)) for i in range(16)]
    params[3] = SamplingParams(temperature=0.0)  # a greedy row in the batch changes nothing for others
    seeds, positions = [1000 + i for i in range(16)], [3 + i for i in range(16)]
    batched, _ = sample(logits, _metadata(params, seeds, positions))
    for row in range(16):
        alone, _ = sample(logits[row:row + 1], _metadata([params[row]], [seeds[row]], [positions[row]]))
        assert alone.item() == batched[row].item()


def test_different_seeds_and_positions_differ() -> None:
    logits = torch.zeros(64, VOCAB)  # uniform: the draw is decided by the randomness alone
    params = [SamplingParams(temperature=1.0)] * 64
    by_seed, _ = sample(logits, _metadata(params, seeds=list(range(64)), positions=[0] * 64))
    by_position, _ = sample(logits, _metadata(params, seeds=[5] * 64, positions=list(range(64))))
    assert len(set(by_seed.tolist())) > 25
    assert len(set(by_position.tolist())) > 25
    again, _ = sample(logits, _metadata(params, seeds=list(range(64)), positions=[0] * 64))
    assert torch.equal(again, by_seed)


def test_large_seeds_stay_in_range() -> None:
    u = random_uniforms(torch.tensor([0, 2**63 - 1, 2**40 + 3]), torch.tensor([0, 2**31, 5]), 1000)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.03
    assert not torch.equal(u[0], u[2])


def test_the_top_hash_is_no_certain_win() -> None:
    """(2^24 - 1 + 0.5) / 2^24 rounds to 1.0 in float32; a u of 1 gives infinite Gumbel noise, and that
    token would win over every logit, a masked (-inf) one too (-inf + inf = NaN, argmax's pick)."""
    u = bits_to_uniforms(torch.tensor([0, 0xFFFFFF00, 0xFFFFFFFF], dtype=torch.int64))
    assert bool(((u > 0) & (u < 1)).all()), u
    logits = torch.tensor([[5.0, float("-inf"), float("-inf")]])  # only token 0 allowed
    gumbel = -torch.log(-torch.log(u))
    assert torch.isfinite(gumbel).all() and (logits + gumbel[None, :]).argmax().item() == 0


def test_top_k_1_is_greedy() -> None:
    logits = _logits(16, seed=2)
    token_ids, _ = sample(logits, _metadata([SamplingParams(temperature=1.5, top_k=1)] * 16))
    assert torch.equal(token_ids, logits.argmax(dim=-1))


def _draws(logits_row: torch.Tensor, params: SamplingParams, num: int) -> torch.Tensor:
    logits = logits_row.expand(num, VOCAB).contiguous()
    token_ids, _ = sample(logits, _metadata([params] * num, seeds=list(range(num)), positions=[11] * num))
    return token_ids


def test_top_k_top_p_min_p_stay_in_allowed_set() -> None:
    row = _logits(1, seed=3)[0]
    probs = row.softmax(-1)
    order = probs.argsort(descending=True)
    # top_p 0.6: the smallest prefix of the sorted tokens whose mass reaches 0.6.
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[: int((cumulative < 0.6).sum()) + 1].tolist())
    cases = [
        (SamplingParams(temperature=1.0, top_k=5), set(order[:5].tolist())),
        (SamplingParams(temperature=1.0, top_p=0.6), nucleus),
        (SamplingParams(temperature=1.0, min_p=0.3), set((probs >= 0.3 * probs.max()).nonzero()[:, 0].tolist())),
    ]
    for params, allowed in cases:
        drawn = set(_draws(row, params, 2000).tolist())
        assert drawn <= allowed, (params, drawn - allowed)
        assert len(drawn) == len(allowed)  # 2000 draws reach every allowed token of these sets


def test_temperature_one_matches_softmax() -> None:
    row = torch.linspace(-2.0, 2.0, VOCAB)
    num = 20000
    counts = torch.bincount(_draws(row, SamplingParams(temperature=1.0), num), minlength=VOCAB).float()
    total_variation = 0.5 * (counts / num - row.softmax(-1)).abs().sum().item()
    assert total_variation < 0.03  # sampling noise alone is ~0.02 here; a wrong distribution is far off
    # Temperature 0.5 sharpens: the empirical distribution follows softmax(logits / 0.5) instead.
    counts = torch.bincount(_draws(row, SamplingParams(temperature=0.5), num), minlength=VOCAB).float()
    assert 0.5 * (counts / num - (row / 0.5).softmax(-1)).abs().sum().item() < 0.03


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[1.6, -1.0, 0.5, 3.0, -2.0, 1.0] + [0.0] * (VOCAB - 6)])
    # prompt [0, 1]; outputs [3, 3, 4]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    metadata = _metadata([params], token_ids=[[0, 1, 3, 3, 4]], num_prompt=[2])
    penalized = apply_penalties(logits, metadata)[0]
    expected = logits[0].clone()
    expected[0] = 1.6 / 2  # prompt token, positive: divided
    expected[1] = -1.0 * 2  # prompt token, negative: multiplied
    expected[3] = 3.0 / 2 - 0.25 * 2 - 0.5  # output twice: repetition, frequency x2, presence
    expected[4] = -2.0 * 2 - 0.25 - 0.5
    torch.testing.assert_close(penalized, expected)
    # Greedy now picks token 5 (1.0) over the penalized tokens 3 (0.5) and 0 (0.8).
    token_ids, _ = sample(logits, metadata)
    assert token_ids.item() == 5


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(4, seed=4)
    params = [SamplingParams(temperature=0.7, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=0)] * 2
    token_ids, logprobs = sample(logits, _metadata(params))
    assert logprobs is not None
    reference = logits.log_softmax(-1)  # before penalties and temperature
    assert logprobs.top_token_ids.shape == (4, 3)
    torch.testing.assert_close(logprobs.sampled_logprobs, reference.gather(1, token_ids[:, None])[:, 0])
    torch.testing.assert_close(logprobs.top_logprobs, reference.topk(3, dim=-1).values)
    assert torch.equal(logprobs.top_token_ids, reference.topk(3, dim=-1).indices)
    assert bool((logprobs.top_logprobs[:, :-1] >= logprobs.top_logprobs[:, 1:]).all())
    assert bool((logprobs.sampled_logprobs <= logprobs.top_logprobs[:, 0]).all())
    # Greedy rows sampled the argmax: their sampled logprob is the top one.
    torch.testing.assert_close(logprobs.sampled_logprobs[1::2], logprobs.top_logprobs[1::2, 0])
    assert math.isclose(logprobs.top_logprobs[0].exp().sum().item(),
                        reference[0].topk(3).values.exp().sum().item(), rel_tol=1e-6)
    assert logprobs.top_logprobs[0].exp().sum().item() < 1.0
