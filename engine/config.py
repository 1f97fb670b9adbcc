"""EngineConfig: every knob of the engine, validated once, never mutated after construction.

Values that depend on the checkpoint (max_model_len=None, dtype="auto") are resolved by the EngineCore.
Each knob is declared here once, with its help line: the worker's settings are built from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def knob(default: Any, help: str) -> Any:
    """A field with the one line of documentation that the worker's settings (TOKENRELAY_<NAME>, built
    from these fields by worker/settings.py), `python -m worker --help` and the README show."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    # None: the embedded default (SmolLM2-135M-Instruct); else a local HF directory, a .gguf file (or a
    # directory holding one), or a hub id (engine/model_files.py resolves it).
    model: str | None = None
    device: str = knob("cpu", "cpu, cuda or cuda:N")
    dtype: str = knob("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    block_size: int = knob(16, "tokens per KV block")
    # "auto": the KV cache in the model dtype; "fp8": e4m3 with one fp32 scale per (token, KV head),
    # half the bytes per token (kernels/reference.py says how it is quantized).
    kv_cache_dtype: Literal["auto", "fp8"] = knob("auto", (
        "auto (the model dtype) or fp8 (e4m3 with a scale per token and KV head: half the KV bytes, "
        "twice the tokens in the pool; quality in BENCHMARKS.md)"))
    num_kv_blocks: int | None = knob(None, "KV blocks; unset: sized from memory (gpu_memory_utilization on GPU)")
    gpu_memory_utilization: float = knob(0.90, "fraction of GPU memory for weights, activations and KV")
    cpu_kv_cache_gb: float = knob(1.0, "KV budget on the CPU when num_kv_blocks is unset")
    max_num_seqs: int = knob(256, "sequences per step (and jobs a worker holds at once)")
    max_num_batched_tokens: int = knob(8192, "token budget per step (decodes + prefill chunks)")
    max_model_len: int | None = knob(None, "context length; unset: the checkpoint's max_position_embeddings")
    # A request's prefill chunk per step while others share the step (running decodes, waiting prompts),
    # so a 32k-token prompt does not hold every other request back for the steps of its prefill.
    long_prefill_token_threshold: int | None = knob(None, (
        "largest prefill chunk of one request while others share the step; unset: half of "
        "max_num_batched_tokens"))
    enable_prefix_caching: bool = knob(True, "reuse KV blocks of shared prompt prefixes")
    scheduling_policy: Literal["fcfs", "priority"] = knob("fcfs", (
        "fcfs, or priority (the job's priority field, lower runs first)"))
    waiting_served_ratio: float | None = knob(None, (
        "TGI admission: admit prompts when waiting >= ratio x running; unset: always"))
    # TGI pairs its ratio with max_waiting_tokens=20: without a bound a prompt that arrives alone beside
    # a full batch would wait until the batch drains.
    max_waiting_steps: int | None = knob(20, (
        "with waiting_served_ratio: ...or after this many steps without admission (TGI pairs its ratio with 20)"))
    enforce_eager: bool = knob(False, "GPU: no CUDA graphs for decode")
    # Schedule and launch step n+1 before step n's sampled tokens reach the host (they feed it on the
    # device), so the host's per-step work overlaps the GPU's. False: one step at a time.
    async_scheduling: bool = knob(True, "launch step n+1 before step n's tokens reach the host (host work overlaps the GPU)")
    seed: int = knob(0, "seeds unseeded requests' sampling, so a run is reproducible end to end")
    # Where GGUF configs and tokenizers converted once are kept; None: TOKENRELAY_CACHE_DIR, else
    # $XDG_CACHE_HOME/tokenrelay or ~/.cache/tokenrelay.
    cache_dir: str | None = knob(None, (
        "where a GGUF's config and tokenizer, converted once, are kept; unset: ~/.cache/tokenrelay"))
    # One model split across this many GPUs of one host (Megatron-style: heads, MLP columns and the
    # vocabulary sharded); one process per rank, the scheduler single in the engine core (rank 0).
    tensor_parallel_size: int = knob(1, (
        "GPUs one model is split across (one process per rank: cuda:N..N+size-1; gloo processes on the CPU)"))
    # "dummy": random weights of the config's shape, nothing read from disk (benchmarks of shapes no
    # checkpoint of which is at hand: a 70B model needs no 140 GB file), as vLLM's load_format.
    load_format: Literal["auto", "dummy"] = knob("auto", (
        "auto (the checkpoint's weights) or dummy (random weights of config.json's shape; benchmarks)"))

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
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            fail(f"long_prefill_token_threshold must be >= 1 or None, got {self.long_prefill_token_threshold}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            fail(f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")
        if self.load_format not in ("auto", "dummy"):
            fail(f"load_format must be 'auto' (the checkpoint) or 'dummy' (random weights), got {self.load_format!r}")
        if self.max_waiting_steps is not None and self.max_waiting_steps < 1:
            fail(f"max_waiting_steps must be >= 1 or None, got {self.max_waiting_steps}")
