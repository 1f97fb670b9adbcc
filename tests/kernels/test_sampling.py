"""kernels.sampling.gumbel_argmax draws exactly the tokens the torch sampler draws (same counter-based
noise, same tie rule), in the logits' own dtype, with greedy rows mixed in and masked tokens never
chosen."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import SamplingMetadata, row_keys, sample
from engine.sampling_params import SamplingParams
from kernels.sampling import gumbel_argmax


def _metadata(temperatures: list[float], vocab: int, device: torch.device) -> SamplingMetadata:
    params = [SamplingParams(temperature=t) for t in temperatures]
    n = len(params)
    return SamplingMetadata.from_params(params, [1000 + 7919 * i for i in range(n)], [3 + 11 * i for i in range(n)],
                                        [[1, 2]] * n, [2] * n, vocab, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_argmax_matches_the_torch_sampler(device: torch.device, dtype: torch.dtype) -> None:
    vocab = 3000  # not a multiple of the tile: the last tile is masked
    temperatures = [0.7, 1.0, 0.0, 1.3, 0.2, 0.0, 2.0, 1.0]
    logits = (torch.randn(len(temperatures), vocab, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    logits = logits.to(device)
    md = _metadata(temperatures, vocab, device)
    expected, _ = sample(logits.float(), md)  # the torch path on the exact fp32 upcast
    got = gumbel_argmax(logits, md.temperature, row_keys(md.seeds, md.positions), block_v=512)
    assert got.tolist() == expected.tolist()
    greedy = [i for i, t in enumerate(temperatures) if t == 0.0]
    assert got[greedy].tolist() == logits.float().argmax(dim=-1)[greedy].tolist()


def test_gumbel_argmax_ties_and_masked_tokens(device: torch.device) -> None:
    vocab = 700
    logits = torch.full((3, vocab), float("-inf"))
    logits[0, [5, 300, 650]] = 1.0  # greedy: the first of equal maxima, across tiles
    logits[1, [123, 456]] = 0.0  # sampled: only the two allowed tokens may come out
    logits[2] = 0.0  # sampled over a flat row: some token in range
    logits = logits.to(device)
    md = _metadata([0.0, 1.0, 1.0], vocab, device)
    got = gumbel_argmax(logits, md.temperature, row_keys(md.seeds, md.positions), block_v=256).tolist()
    assert got[0] == 5
    assert got[1] in (123, 456)
    assert 0 <= got[2] < vocab
    expected, _ = sample(logits, md)
    assert got == expected.tolist()


def test_gumbel_argmax_rejects_bad_logits(device: torch.device) -> None:
    md = _metadata([1.0, 1.0], 16, device)
    with pytest.raises(ValueError, match="unit stride"):
        gumbel_argmax(torch.zeros(16, 2, device=device).t(), md.temperature, row_keys(md.seeds, md.positions))


def test_sample_routes_temperature_batches_to_the_kernel(device: torch.device,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.sampler

    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return gumbel_argmax(*args, **kwargs)  # type: ignore[arg-type]

    vocab = 1000
    logits = (torch.randn(6, vocab, generator=torch.Generator().manual_seed(9)) * 2).to(torch.bfloat16).to(device)
    plain = _metadata([0.9, 0.0, 1.1, 1.0, 0.5, 0.0], vocab, device)
    expected, _ = sample(logits.float(), plain)  # torch ops: no kernel for this device type until patched
    monkeypatch.setattr(engine.sampler, "_fused_gumbel_argmax", lambda device_type: counting)
    assert engine.sampler.takes_model_dtype(plain, device, constrained=False)
    assert not engine.sampler.takes_model_dtype(plain, device, constrained=True)  # a grammar's mask reads fp32
    got, _ = sample(logits, plain)  # the kernel, on the logits in the model's dtype
    assert len(calls) == 1
    assert got.tolist() == expected.tolist()
    # top-p needs the sorted softmax: the torch path, and fp32 logits.
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 2
    nucleus = SamplingMetadata.from_params(params, [1, 2], [5, 5], [[1]] * 2, [1] * 2, vocab, device)
    calls.clear()
    sample(logits[:2], nucleus)
    assert not calls and not engine.sampler.takes_model_dtype(nucleus, device, constrained=False)


def test_the_start_up_check_accepts_the_kernel_and_refuses_a_wrong_one(device: torch.device) -> None:
    from engine.sampler import agrees_with_torch

    assert agrees_with_torch(gumbel_argmax, device)

    def off_by_one(logits: torch.Tensor, temperature: torch.Tensor, row_key: torch.Tensor) -> torch.Tensor:
        return gumbel_argmax(logits, temperature, row_key ^ 1)  # other noise: other draws

    assert not agrees_with_torch(off_by_one, device)
