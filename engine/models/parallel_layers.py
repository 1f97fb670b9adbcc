"""Tensor-parallel versions of the layers in layers.py (Megatron's split): each holds its rank's shard and
its weight_loader cuts that shard out of the full checkpoint tensor, so every checkpoint format (safetensors,
GGUF, dummy) loads through the same `load_weights(model, (name, tensor))` path.

Column-parallel layers (merged QKV, gate/up) split output rows and need no communication; the row-parallel
ones (o_proj, down_proj) split their input and sum the partial products with one all-reduce. The vocabulary
is split in contiguous ranges, padded up to a multiple of the ranks; the LM head all-gathers its logits.
Only built when tensor_parallel_size > 1: at 1 the model uses layers.py unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import TPInfo, all_gather_last_dim, all_reduce
from engine.errors import UnsupportedModelError
from engine.models.layers import Linear, MergedLinear, QKVLinear, VocabEmbedding, _copy_shard


def kv_head_range(num_kv_heads: int, tp: TPInfo) -> tuple[int, int]:
    """(first KV head, KV heads) of this rank: a contiguous split, or one replicated head when there
    are fewer KV heads than ranks (ranks tp.size // num_kv_heads apart share one)."""
    return tp.rank * num_kv_heads // tp.size, max(1, num_kv_heads // tp.size)


def _rows(loaded: torch.Tensor, start: int, size: int, full: int) -> torch.Tensor:
    if loaded.shape[0] != full:
        raise UnsupportedModelError(
            f"checkpoint tensor of shape {tuple(loaded.shape)} has {loaded.shape[0]} rows where the config "
            f"says {full}: the config.json does not describe these weights")
    return loaded.narrow(0, start, size)


def _load_vocab_shard(param: nn.Parameter, loaded: torch.Tensor, first: int, vocab_size: int) -> None:
    """Rows [first, first + len(param)) of a [vocab, hidden] tensor; rows past vocab_size stay zero."""
    if loaded.shape[1:] != param.shape[1:]:
        raise UnsupportedModelError(
            f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a vocabulary shard of shape "
            f"{tuple(param.shape)}: the config.json does not describe these weights")
    num_real = max(0, min(param.shape[0], vocab_size - first))
    param.data.zero_()
    _copy_shard(param, _rows(loaded, first, num_real, vocab_size), 0, num_real)


class QKVParallelLinear(QKVLinear):
    """This rank's q heads and KV heads of the fused q/k/v projection."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, tp: TPInfo,
                 bias: bool = False) -> None:
        self.tp, self.head_dim = tp, head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.first_kv_head, num_local_kv_heads = kv_head_range(num_kv_heads, tp)
        super().__init__(hidden_size, num_heads // tp.size, num_local_kv_heads, head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        d = self.head_dim
        if shard_id == "q":
            shard = _rows(loaded, self.tp.rank * self.q_size, self.q_size, self.num_heads * d)
        else:
            shard = _rows(loaded, self.first_kv_head * d, self.kv_size, self.num_kv_heads * d)
        super().weight_loader(param, shard, shard_id)


class MergedColumnParallelLinear(MergedLinear):
    """This rank's rows of each stacked projection (gate_proj, up_proj)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], tp: TPInfo, bias: bool = False) -> None:
        self.tp = tp
        self.full_sizes = list(output_sizes)
        super().__init__(in_features, [n // tp.size for n in output_sizes], bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int), f"MergedColumnParallelLinear shard_id must be an int, got {shard_id!r}"
        size = self.output_sizes[shard_id]
        super().weight_loader(param, _rows(loaded, self.tp.rank * size, size, self.full_sizes[shard_id]),
                              shard_id)


class RowParallelLinear(Linear):
    """y = all_reduce(x_shard @ W_shard.T) + b: this rank's input columns; the bias added once, after."""

    def __init__(self, in_features: int, out_features: int, tp: TPInfo, bias: bool = False) -> None:
        self.tp = tp
        self.full_in_features = in_features
        super().__init__(in_features // tp.size, out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if param.dim() == 2:  # the bias is whole on every rank
            if loaded.dim() != 2 or loaded.shape[1] != self.full_in_features:
                raise UnsupportedModelError(
                    f"checkpoint tensor of shape {tuple(loaded.shape)} does not have the {self.full_in_features} "
                    f"input columns the config says: the config.json does not describe these weights")
            loaded = loaded.narrow(1, self.tp.rank * self.in_features, self.in_features)
        super().weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(VocabEmbedding):
    """Rows [first, first + per_rank) of the vocabulary (the last rank's tail past vocab_size is zero
    padding); ids outside the range look up zeros, and the all-reduce puts each id's row together."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo) -> None:
        self.vocab_size, self.tp = vocab_size, tp
        self.num_per_rank = -(-vocab_size // tp.size)
        self.first = tp.rank * self.num_per_rank
        super().__init__(self.num_per_rank, hidden_size)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        _load_vocab_shard(param, loaded, self.first, self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        local = input_ids - self.first
        is_here = (local >= 0) & (local < self.num_per_rank)
        out = F.embedding(local.masked_fill(~is_here, 0), self.weight)
        return all_reduce(out.masked_fill_(~is_here[:, None], 0.0))


class ParallelLMHead(Linear):
    """This rank's vocabulary rows of the LM head (the embedding's own shard when tied); the logits of
    every rank are gathered, the padding cut off."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPInfo) -> None:
        self.vocab_size, self.tp = vocab_size, tp
        self.num_per_rank = -(-vocab_size // tp.size)
        self.first = tp.rank * self.num_per_rank
        super().__init__(hidden_size, self.num_per_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        _load_vocab_shard(param, loaded, self.first, self.vocab_size)  # an untied head: as the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        logits = all_gather_last_dim(F.linear(x, self.weight), self.tp.size)
        return logits[..., :self.vocab_size]
