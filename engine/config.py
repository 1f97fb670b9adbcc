"""EngineConfig: every knob of the engine, validated once, never mutated after construction.

Values that depend on the checkpoint (max_model_len=None, dtype="auto") are resolved by LLMEngine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EngineConfig:
    # None: the embedded default (SmolLM2-135M-Instruct); else a local HF directory, a .gguf file (or a
    # directory holding one), or a hub id (engine/model_files.py resolves it).
    model: str | None = None
    device: str = "cpu"  # "cpu" or "cuda" / "cuda:N"
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU; or "float32", "bfloat16", "float16"
    block_size: int = 16  # tokens per KV block
    # "auto": the KV cache in the model dtype; "fp8": e4m3 with one fp32 scale per (token, KV head),
    # half the bytes per token (kernels/reference.py says how it is quantized).
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    num_kv_blocks: int | None = None  # None: sized from memory (gpu_memory_utilization on GPU)
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory for weights + activations + KV
    cpu_kv_cache_gb: float = 1.0  # KV budget on the CPU when num_kv_blocks is None
    max_num_seqs: int = 256  # sequence cap per step
    max_num_batched_tokens: int = 8192  # token budget per step
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    waiting_served_ratio: float | None = None  # TGI admission: admit when waiting >= ratio * running
    max_waiting_steps: int | None = None  # ...or when this many steps passed without admission
    enforce_eager: bool = False  # GPU: disable CUDA graphs for decode
    # Schedule and launch step n+1 before step n's sampled tokens reach the host (they feed it on the
    # device), so the host's per-step work overlaps the GPU's. False: one step at a time.
    async_scheduling: bool = True
    seed: int = 0  # seeds unseeded requests' randomness, so a run is reproducible end to end
    # Where GGUF configs and tokenizers converted once are kept; None: TOKENRELAY_CACHE_DIR, else
    # $XDG_CACHE_HOME/tokenrelay or ~/.cache/tokenrelay.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(message)

        if self.model is not None and not self.model.strip():
            fail("model must be None (the embedded default) or name a local directory, a .gguf file or a "
                 "hub id; got an empty string")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            fail(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            fail(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            fail(f"kv_cache_dtype must be 'auto' (the model dtype) or 'fp8' (e4m3); got {self.kv_cache_dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            fail(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            fail(f"num_kv_blocks must be >= 1 or None (size from memory), got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            fail(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gb <= 0:
            fail(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
        if self.max_num_seqs < 1:
            fail(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            fail(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            fail(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                 f"({self.max_num_seqs}) so every running sequence can decode each step")
        if self.max_model_len is not None and self.max_model_len < 1:
            fail(f"max_model_len must be >= 1 or None, got {self.max_model_len}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            fail(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.waiting_served_ratio is not None and self.waiting_served_ratio < 0:
            fail(f"waiting_served_ratio must be >= 0 or None, got {self.waiting_served_ratio}")
        if self.max_waiting_steps is not None and self.max_waiting_steps < 1:
            fail(f"max_waiting_steps must be >= 1 or None, got {self.max_waiting_steps}")
