"""The benchmark workload of shared/DESIGN.md and the model shapes it runs on.

A random-weight checkpoint (with a word-level tokenizer covering the whole vocabulary, so every random
id decodes) is written with save_pretrained, so the engine loads it like any real checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

MODEL_SHAPES: dict[str, dict[str, object]] = {
    # Qwen3-0.6B-shaped: the model every quoted figure uses.
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True),
    # Llama-3.2-1B-shaped, the optional second shape.
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True),
    # A small model for --quick smoke runs (CPU or GPU).
    "tiny": dict(arch="qwen3", vocab_size=4096, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
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
                  max_token_id: int = 10000, seed: int = 0) -> Workload:
    """Prompt and output lengths uniform in [min_len, max_len] from random.Random(seed); random ids."""
    rng = random.Random(seed)
    prompt_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    output_lens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    prompts = [[rng.randint(0, max_token_id) for _ in range(n)] for n in prompt_lens]
    return Workload(prompts=prompts, output_lens=output_lens)


def kv_bytes_per_token(shape: dict[str, object], dtype_bytes: int = 2) -> int:
    layers, kv_heads, head_dim = (int(shape[k]) for k in  # type: ignore[call-overload]
                                  ("num_hidden_layers", "num_key_value_heads", "head_dim"))
    return layers * 2 * kv_heads * head_dim * dtype_bytes


def roofline_bytes(workload: Workload, shape: dict[str, object], weight_bytes: int) -> tuple[int, int]:
    """(KV bytes every output token must read, weight bytes read once per decode step)."""
    per_token = kv_bytes_per_token(shape)
    kv = 0
    for prompt, n_out in zip(workload.prompts, workload.output_lens, strict=True):
        p = len(prompt)
        kv += per_token * (n_out * p + n_out * (n_out - 1) // 2)  # contexts p, p+1, ..., p+n_out-1
    steps = max(workload.output_lens)  # every request decoding in the same steps
    return kv, weight_bytes * steps


def make_checkpoint(name: str, path: Path, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Write a random-weight checkpoint of MODEL_SHAPES[name] plus a word-level tokenizer to path."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

    shape = dict(MODEL_SHAPES[name])
    arch = shape.pop("arch")
    config_cls = Qwen3Config if arch == "qwen3" else LlamaConfig
    vocab_size = int(shape["vocab_size"])  # type: ignore[call-overload]
    config = config_cls(**shape, max_position_embeddings=4096, rope_theta=1000000.0,
                        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1").save_pretrained(path)
    del model
    return path
