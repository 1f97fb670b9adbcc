"""The benchmark workload of shared/DESIGN.md and the model shapes it runs on.

A random-weight checkpoint (with a word-level tokenizer covering the whole vocabulary, so every random
id decodes) is written with save_pretrained, so the engine loads it like any real checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_SHAPES: dict[str, dict[str, object]] = {
    # Qwen3-0.6B-shaped: the model every quoted figure uses.
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True),
    # Llama-3.2-1B-shaped, the optional second shape.
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True),
    # Llama-3-70B-shaped (140 GB in bf16: more than one H200 holds): the tensor-parallel benchmark, on random
    # weights made on the GPUs (load_format="dummy"), never written to disk.
    "llama-3-70b": dict(arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=False),
    # A small model for --quick smoke runs (CPU or GPU).
    "tiny": dict(arch="qwen3", vocab_size=4096, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
}


# name -> (prompt length range, output length range), each uniform and inclusive.
WORKLOADS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "benchmark": ((100, 1024), (100, 1024)),  # shared/DESIGN.md's benchmark (nano-vllm's)
    "prefill-heavy": ((1024, 4096), (32, 128)),  # RAG and summarisation: 653,210 prompt + 20,125 output tokens
}


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(num_requests: int = 256, min_len: int = 100, max_len: int = 1024,
                  max_token_id: int = 10000, seed: int = 0, output_range: tuple[int, int] | None = None
                  ) -> Workload:
    """Prompt lengths uniform in [min_len, max_len], output lengths in output_range (default: the same
    range), random ids, from random.Random(seed), drawn as nano-vllm's bench draws them: all prompt
    lengths, then all output lengths, then the ids."""
    rng = random.Random(seed)
    out_min, out_max = output_range or (min_len, max_len)
    prompt_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    output_lens = [rng.randint(out_min, out_max) for _ in range(num_requests)]
    prompts = [[rng.randint(0, max_token_id) for _ in range(n)] for n in prompt_lens]
    return Workload(prompts=prompts, output_lens=output_lens)


def named_workload(name: str, num_requests: int = 256) -> Workload:
    (min_len, max_len), output_range = WORKLOADS[name]
    return make_workload(num_requests, min_len, max_len, output_range=output_range)


def _dims(shape: dict[str, object], *keys: str) -> list[int]:
    return [int(shape[k]) for k in keys]  # type: ignore[call-overload]


def kv_bytes_per_token(shape: dict[str, object], kv_cache_dtype: str = "auto") -> int:
    """KV bytes of one token of context: bf16 values, or fp8 values plus an fp32 scale per KV head."""
    layers, kv_heads, head_dim = _dims(shape, "num_hidden_layers", "num_key_value_heads", "head_dim")
    row_bytes = head_dim + 4 if kv_cache_dtype == "fp8" else 2 * head_dim
    return layers * 2 * kv_heads * row_bytes


def prefill_flops(workload: Workload, shape: dict[str, object]) -> float:
    """FLOPs of every prompt's prefill: the layers' matmuls over each prompt token, causal attention
    (QK^T and PV over positions 1..P), the LM head for the one token each prompt samples."""
    hidden, inter, layers, heads, kv_heads, head_dim, vocab = _dims(
        shape, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size")
    q, kv = heads * head_dim, kv_heads * head_dim
    layer_params = hidden * (q + 2 * kv) + q * hidden + hidden * 2 * inter + inter * hidden
    causal_pairs = sum(len(p) * (len(p) + 1) / 2 for p in workload.prompts)
    attention = 4.0 * layers * heads * head_dim * causal_pairs
    return 2.0 * layers * layer_params * workload.num_prompt_tokens + attention \
        + 2.0 * vocab * hidden * len(workload.prompts)


def attention_prefill_flops(prompt_lens: list[int], shape: dict[str, object]) -> float:
    """Causal attention FLOPs of one layer's prefill over fresh prompts (what the prefill kernel does)."""
    heads, head_dim = _dims(shape, "num_attention_heads", "head_dim")
    return 4.0 * heads * head_dim * sum(n * (n + 1) / 2 for n in prompt_lens)


def roofline_bytes(workload: Workload, shape: dict[str, object], weight_bytes: int,
                   kv_cache_dtype: str = "auto") -> tuple[int, int]:
    """(KV bytes every output token must read, weight bytes read once per decode step)."""
    per_token = kv_bytes_per_token(shape, kv_cache_dtype)
    kv = 0
    for prompt, n_out in zip(workload.prompts, workload.output_lens, strict=True):
        p = len(prompt)
        kv += per_token * (n_out * p + n_out * (n_out - 1) // 2)  # contexts p, p+1, ..., p+n_out-1
    steps = max(workload.output_lens)  # every request decoding in the same steps
    return kv, weight_bytes * steps


def num_parameters(shape: dict[str, object]) -> int:
    """Parameters of a MODEL_SHAPES entry (what its bf16 weights weigh, halved)."""
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = _dims(
        shape, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim")
    q, kv = heads * head_dim, kv_heads * head_dim
    qk_norm = 2 * head_dim if shape["arch"] == "qwen3" else 0
    layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden + qk_norm
    embeddings = vocab * hidden * (1 if shape.get("tie_word_embeddings") else 2)
    return embeddings + layers * layer + hidden


def write_config_dir(name: str, path: Path) -> Any:
    """config.json and a word-level tokenizer covering the whole vocabulary of MODEL_SHAPES[name], no
    weights: what an engine with load_format="dummy" needs. Returns the HF config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

    shape = dict(MODEL_SHAPES[name])
    arch = shape.pop("arch")
    config_cls = Qwen3Config if arch == "qwen3" else LlamaConfig
    vocab_size = int(shape["vocab_size"])  # type: ignore[call-overload]
    # 8192 positions: room for the prefill-heavy workload's 4096 + 128 tokens (vLLM caps max_model_len here).
    config = config_cls(**shape, max_position_embeddings=8192, rope_theta=1000000.0,
                        bos_token_id=0, eos_token_id=1, architectures=[f"{config_cls.__name__[:-6]}ForCausalLM"])
    config.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1").save_pretrained(path)
    return config


def make_checkpoint(name: str, path: Path, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Write a random-weight checkpoint of MODEL_SHAPES[name] plus a word-level tokenizer to path."""
    import torch
    from transformers import AutoModelForCausalLM

    config = write_config_dir(name, path)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    del model
    return path
