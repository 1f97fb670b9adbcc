"""Tensor parallelism's process group: one per engine, one rank per model-runner process (NCCL on GPUs,
gloo on the CPU), and the three collectives the parallel layers need (all-reduce, all-gather, broadcast).

Each model-runner process is exactly one rank of one group, so the collectives use torch.distributed's
default group; the layers learn their rank and the group's size when they are built (TPInfo)."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) off in every process the engine starts: the multi-GPU hosts we are lent must
# run with it off (NCCL's NVLS, torch's symmetric memory, NVSHMEM), and one all-reduce per layer does
# not need it.
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# How long a collective (or the rendezvous) waits for a peer before it fails: bounds the hang of the
# ranks left when one dies inside a step on NCCL (gloo notices the closed connection at once).
COLLECTIVE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TPInfo:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1

    @property
    def is_driver(self) -> bool:
        """Rank 0 samples and talks to the scheduler; the others only compute their shards."""
        return self.rank == 0


def disable_nvlink_multicast() -> None:
    os.environ.update(MULTICAST_OFF_ENV)


def free_init_method() -> str:
    """A tcp:// rendezvous address on a free local port (rank 0 serves the store there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: cuda:(N + r) for device cuda[:N]; the CPU for every rank on the CPU."""
    base = torch.device(device)
    if base.type != "cuda" or rank == 0:
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def ensure_no_process_group() -> None:
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine already runs in this process (one per process): shut "
                           "it down first (LLMEngine.shutdown(), AsyncEngine.shutdown())")


def init_distributed(tp: TPInfo, device: torch.device, init_method: str) -> None:
    """Join the group (blocks until every rank has); NCCL on CUDA, gloo on the CPU."""
    ensure_no_process_group()
    disable_nvlink_multicast()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is not None:  # plain "cuda" (rank 0): the current device
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=tp.rank, world_size=tp.size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # The first collective builds NCCL's communicator: do it now, outside any CUDA-graph capture.
    warmup = torch.zeros(1, device=device)
    dist.all_reduce(warmup)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place on x (a row-parallel layer's partial products)."""
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[..., n] on each rank -> [..., world_size * n], rank order (a vocab-parallel head's logits)."""
    gathered = torch.empty((world_size, *x.shape), dtype=x.dtype, device=x.device)
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(gathered, x.contiguous())
    else:  # gloo has no all_gather_into_tensor
        dist.all_gather(list(gathered.unbind(0)), x.contiguous())
    return gathered.movedim(0, -2).reshape(*x.shape[:-1], world_size * x.shape[-1])


def broadcast_from_driver(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank, in place (the tokens rank 0 sampled)."""
    dist.broadcast(x, src=0)
    return x
