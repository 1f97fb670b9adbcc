"""The sampler: penalties, greedy/temperature/top-k/top-p/min-p, and seeded sampling whose randomness
is a pure function of (seed, position, vocab index), so a request samples the same in any batch.

SamplingMetadata holds one row per sampled request, as tensors on the logits' device."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
_SEED_MASK = (1 << 63) - 1  # seeds are taken mod 2^63 so they fit an int64 tensor


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [N] fp32; 0 for greedy rows
    top_p: torch.Tensor  # [N] fp32 in (0, 1]
    top_k: torch.Tensor  # [N] int64; 0 disables
    min_p: torch.Tensor  # [N] fp32 in [0, 1]
    seeds: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64: index of the token being generated in the request's token ids
    is_all_greedy: bool
    is_any_greedy: bool
    is_any_top_k: bool
    is_any_top_p: bool
    is_any_min_p: bool
    # Penalties: None when no row has any (the common case costs nothing).
    repetition_penalty: torch.Tensor | None = None  # [N] fp32
    presence_penalty: torch.Tensor | None = None  # [N] fp32
    frequency_penalty: torch.Tensor | None = None  # [N] fp32
    prompt_token_ids: torch.Tensor | None = None  # [N, max_prompt_len] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None = None  # [N, max_output_len] int64, padded with vocab_size
    max_num_logprobs: int | None = None  # top logprobs to return (max over rows); None: no row asked
    # Structured outputs: the allowed tokens of the constrained rows (engine/structured_output.py).
    token_bitmask: torch.Tensor | None = None  # [K, ceil(V/32)] int32, bit j of a row set: token j allowed
    bitmask_rows: torch.Tensor | None = None  # [K] int64 rows of the batch they mask; None: every row

    @classmethod
    def from_params(
        cls,
        sampling_params: Sequence[SamplingParams],
        seeds: Sequence[int],
        positions: Sequence[int],
        token_ids: Sequence[Sequence[int]],  # each row's tokens so far (prompt then outputs)
        num_prompt_tokens: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Build the row tensors; token_ids are only read for rows of a batch that uses penalties."""
        sp = sampling_params

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        is_greedy = [p.is_greedy for p in sp]
        if all(is_greedy) and not any(p.has_penalties for p in sp):
            # The all-greedy batch (the benchmark's) reads none of the row tensors: skip their copies.
            none = torch.empty(0, device=device)
            wanted = [p.logprobs for p in sp if p.logprobs is not None]
            return cls(temperature=none, top_p=none, top_k=none, min_p=none, seeds=none, positions=none,
                       is_all_greedy=True, is_any_greedy=True, is_any_top_k=False, is_any_top_p=False,
                       is_any_min_p=False, max_num_logprobs=max(wanted) if wanted else None)
        md = cls(
            temperature=floats([p.temperature for p in sp]),
            top_p=floats([p.top_p for p in sp]),
            top_k=torch.tensor([p.top_k for p in sp], dtype=torch.int64, device=device),
            min_p=floats([p.min_p for p in sp]),
            seeds=torch.tensor([s & _SEED_MASK for s in seeds], dtype=torch.int64, device=device),
            positions=torch.tensor(list(positions), dtype=torch.int64, device=device),
            is_all_greedy=all(is_greedy),
            is_any_greedy=any(is_greedy),
            is_any_top_k=any(p.top_k > 0 and not p.is_greedy for p in sp),
            is_any_top_p=any(p.top_p < 1.0 and not p.is_greedy for p in sp),
            is_any_min_p=any(p.min_p > 0.0 and not p.is_greedy for p in sp),
        )
        wanted = [p.logprobs for p in sp if p.logprobs is not None]
        md.max_num_logprobs = max(wanted) if wanted else None
        if any(p.has_penalties for p in sp):
            md.repetition_penalty = floats([p.repetition_penalty for p in sp])
            md.presence_penalty = floats([p.presence_penalty for p in sp])
            md.frequency_penalty = floats([p.frequency_penalty for p in sp])
            md.prompt_token_ids = _pad([list(t[:n]) for t, n in zip(token_ids, num_prompt_tokens, strict=True)],
                                       vocab_size, device)
            md.output_token_ids = _pad([list(t[n:]) for t, n in zip(token_ids, num_prompt_tokens, strict=True)],
                                       vocab_size, device)
        return md


@dataclass
class SampleLogprobs:
    top_token_ids: torch.Tensor  # [N, max_num_logprobs] int64, best first
    top_logprobs: torch.Tensor  # [N, max_num_logprobs] fp32
    sampled_logprobs: torch.Tensor  # [N] fp32: logprob of each sampled token


class Sampler:
    """Stateless; a class so the runner holds one and a later GPU task can swap in fused kernels."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata
                 ) -> tuple[torch.Tensor, SampleLogprobs | None]:
        return sample(logits, metadata)


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> tuple[torch.Tensor, SampleLogprobs | None]:
    """logits [N, V] fp32 (raw model output; any float dtype for an all-greedy batch without logprobs)
    -> (token_ids [N] int64, logprobs or None). No host sync."""
    md = metadata
    logprobs_src = logits
    if md.repetition_penalty is not None:
        logits = apply_penalties(logits, md)
    if md.token_bitmask is not None:
        from engine.structured_output import apply_token_bitmask

        if logits is logprobs_src and md.max_num_logprobs is not None:
            logits = logits.clone()  # logprobs stay the model's own, before the grammar's mask
        apply_token_bitmask(logits, md.token_bitmask, md.bitmask_rows)
    if md.is_all_greedy:
        token_ids = logits.argmax(dim=-1)
    elif (fused := _fused_gumbel_argmax(logits.device.type)) is not None and not _needs_sort_or_softmax(md):
        # One pass over the logits instead of ~15 int64 passes for the noise: the same tokens. The kernel
        # is looked up first on purpose: the model runner's profile run samples at start-up, so the
        # kernel's compile and check happen there, not under a request.
        token_ids = fused(logits, md.temperature, row_keys(md.seeds, md.positions))
    else:
        token_ids = _sample_random(logits, md)
        if md.is_any_greedy:
            token_ids = torch.where(md.temperature == 0.0, logits.argmax(dim=-1), token_ids)
    return token_ids, _logprobs(logprobs_src, token_ids, md.max_num_logprobs)


def takes_model_dtype(md: SamplingMetadata, device: torch.device, constrained: bool) -> bool:
    """Whether sample() may be given the logits in the model's dtype (no fp32 upcast first): an
    all-greedy batch, or one the fused kernel samples, when nothing else reads them (logprobs,
    penalties, a grammar's mask). constrained: a row has a grammar (its bitmask may be attached to md
    only later, when a step launched ahead is sampled)."""
    if md.max_num_logprobs is not None or md.repetition_penalty is not None or constrained:
        return False
    return md.is_all_greedy or (_fused_gumbel_argmax(device.type) is not None and not _needs_sort_or_softmax(md))


def _needs_sort_or_softmax(md: SamplingMetadata) -> bool:
    return md.is_any_top_k or md.is_any_top_p or md.is_any_min_p


@functools.cache
def _fused_gumbel_argmax(device_type: str) -> Callable[..., torch.Tensor] | None:
    """kernels.sampling.gumbel_argmax on CUDA, once it has drawn the torch path's tokens on a small batch
    on this device; None elsewhere, or when Triton cannot compile it or it disagrees (torch ops then)."""
    if device_type != "cuda":
        return None
    try:
        from kernels.sampling import gumbel_argmax

        if agrees_with_torch(gumbel_argmax, torch.device(device_type)):
            return gumbel_argmax
        logger.warning("fused sampling kernel disagrees with the torch sampler on this device; using torch ops")
    except Exception as exc:  # a broken Triton install must not take sampling down
        logger.warning("fused sampling kernel unavailable (%s); using torch ops", exc)
    return None


def agrees_with_torch(kernel: Callable[..., torch.Tensor], device: torch.device) -> bool:
    """Whether `kernel` (gumbel_argmax's signature) draws the tokens _sample_random draws, greedy rows
    and large seeds included, on fp32 logits and on bf16 ones (which it reads without an upcast)."""
    logits = (torch.randn(4, 4099, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    md = SamplingMetadata.from_params(
        [SamplingParams(temperature=t) for t in (1.0, 0.0, 0.7, 1.3)], [11, 12, 13, 2**40 + 5],
        [1, 2, 300, 4096], [[0]] * 4, [1] * 4, logits.shape[1], device)
    keys = row_keys(md.seeds, md.positions)
    for rows in (logits, logits.to(torch.bfloat16)):
        exact = rows.float()
        expected = torch.where(md.temperature == 0.0, exact.argmax(dim=-1), _sample_random(exact, md))
        if not torch.equal(kernel(rows, md.temperature, keys), expected):
            return False
    return True


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF: prompt and output tokens; positive logits divided, negative multiplied), then
    presence and frequency (OpenAI: output tokens only). Returns a new tensor."""
    assert md.prompt_token_ids is not None and md.output_token_ids is not None
    assert md.presence_penalty is not None and md.frequency_penalty is not None
    assert md.repetition_penalty is not None
    num_rows, vocab_size = logits.shape
    output_counts = _token_counts(md.output_token_ids, num_rows, vocab_size)  # [N, V]
    seen = (_token_counts(md.prompt_token_ids, num_rows, vocab_size) + output_counts) > 0
    penalty = md.repetition_penalty[:, None]
    repeated = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen, repeated, logits)
    logits = logits - md.frequency_penalty[:, None] * output_counts
    return logits - md.presence_penalty[:, None] * (output_counts > 0).to(logits.dtype)


def _sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    # Greedy rows divide by 1 here; their result is replaced by the argmax afterwards.
    temperature = torch.where(md.temperature == 0.0, 1.0, md.temperature)
    logits = logits / temperature[:, None]
    if md.is_any_top_k or md.is_any_top_p:
        logits = _apply_top_k_top_p(logits, md)
    if md.is_any_min_p:
        probs = logits.softmax(dim=-1)
        threshold = md.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    uniforms = random_uniforms(md.seeds, md.positions, logits.shape[1])  # [N, V] in (0, 1)
    return (logits - torch.log(-torch.log(uniforms))).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    vocab_size = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [N, V]
    if md.is_any_top_k:
        top_k = torch.where(md.top_k > 0, md.top_k.clamp(max=vocab_size), vocab_size)
        kth = sorted_logits.gather(1, (top_k - 1)[:, None])  # [N, 1]; ties with the k-th are kept
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if md.is_any_top_p:
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens before it already cover top_p; the best token always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        # Rows with top_p == 1 are left alone: cumsum rounding must not trim their tail in a batch
        # when it would not alone.
        drop = (mass_before >= md.top_p[:, None]) & (md.top_p < 1.0)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def random_uniforms(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), [N, V] float32, each a hash of (seed, position, vocab index): counter-based,
    so no generator state and no dependence on batch composition. int64 ops on 32-bit lanes."""
    row_key = row_keys(seeds, positions)  # [N]
    vocab_key = _mix32(torch.arange(vocab_size, dtype=torch.int64, device=seeds.device) ^ 0x1B873593)
    bits = _mix32(row_key[:, None] ^ vocab_key[None, :])  # [N, V] in [0, 2^32)
    return bits_to_uniforms(bits)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N] int64 in [0, 2^32): the row's half of the noise hash, of its seed and position."""
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32(positions & _MASK32) ^ 0x3C6EF372))


# The largest float32 below 1. (2^24 - 1 + 0.5) / 2^24 rounds to exactly 1.0 in float32, and a u of 1
# makes the Gumbel noise -log(-log(u)) infinite: that token would win whatever its logit (-inf, a
# masked token, included: -inf + inf is NaN, which argmax picks). One draw in 2^24 per vocab entry,
# about 1% of the steps at a 150k vocab.
_BELOW_ONE = 1.0 - 2.0**-24


def bits_to_uniforms(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> uniforms strictly inside (0, 1), float32: the top 24 bits, centred in their bin."""
    return (((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=_BELOW_ONE)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    # x * constant mod 2^32 with 16-bit halves of the constant, so products stay below 2^49.
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijection on [0, 2^32) with full avalanche."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor, num: int | None) -> SampleLogprobs | None:
    if num is None:
        return None
    logprobs = raw_logits.log_softmax(dim=-1)
    num = min(num, logprobs.shape[1])
    top_logprobs, top_token_ids = logprobs.topk(num, dim=-1) if num > 0 else (
        logprobs[:, :0], torch.empty((logprobs.shape[0], 0), dtype=torch.int64, device=logprobs.device))
    sampled = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    return SampleLogprobs(top_token_ids=top_token_ids, top_logprobs=top_logprobs, sampled_logprobs=sampled)


def _token_counts(padded_ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    # Padding id == vocab_size lands in an extra column that is dropped.
    counts = torch.zeros((num_rows, vocab_size + 1), dtype=torch.float32, device=padded_ids.device)
    counts.scatter_add_(1, padded_ids, torch.ones_like(padded_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _pad(rows: list[list[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)
