"""Kernel tests run everywhere: on a host without CUDA the Triton kernels run under the interpreter,
and tests marked `gpu` (the larger sweeps) are skipped."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    # Triton reads TRITON_INTERPRET when a kernel is decorated. If another test package imported the
    # kernels first, they were decorated for a GPU: decorate them again, in import order. reload keeps
    # each module's namespace, so functions already imported elsewhere see the interpreted kernels.
    for name in ("kernels.kv_cache", "kernels.rope", "kernels.decode_attention", "kernels.prefill_attention"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
