"""Tiny real HF checkpoints made on the spot: random weights, a byte-level BPE tokenizer trained here.

No hub access is needed; each checkpoint is saved with save_pretrained (safetensors) like a real one."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Continuous batching keeps the GPU busy while requests come and go.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Redis streams carry jobs to workers and tokens back to clients.",
    "Hello world! Hello tokenrelay. Bonjour le monde, ça va? Grüße aus München.",
    "日本語のテキストも少し。Emoji too: 🚀🔥✨ and numbers 0123456789.",
    "def main():\n    print('hello')\n    return 42\n",
    "user: what is the capital of France?\nassistant: Paris is the capital of France.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 320):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: str, vocab_size: int, bos: int, eos: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        common.update(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        common.update(overrides)
        return LlamaConfig(**common)
    if arch == "mistral":
        common.update(rope_theta=10000.0, sliding_window=None)
        common.update(overrides)
        return MistralConfig(**common)
    if arch == "qwen2":
        common.update(rope_theta=1000000.0, tie_word_embeddings=True)
        common.update(overrides)
        return Qwen2Config(**common)
    if arch == "qwen3":
        common.update(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=True)
        common.update(overrides)
        return Qwen3Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")


def make_tiny_model(arch: str, path: str | os.PathLike[str], seed: int = 0, **overrides) -> Path:
    """Save a tiny random `arch` checkpoint with its tokenizer into `path`; return the path."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<s>")
    eos = tokenizer.convert_tokens_to_ids("</s>")
    # A vocab_size override larger than the tokenizer's leaves ids that decode to nothing (never prompted).
    config = _config(arch, overrides.pop("vocab_size", len(tokenizer)), bos, eos, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; widen them so greedy argmax is far from ties and sampled
    # text is not pure noise. std 0.02 -> 0.2 on embeddings and the LM head.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.2)
            elif p.dim() == 2:
                p.normal_(0.0, 0.15)  # strong layers: the residual stream must not just echo the input
            elif p.dim() == 1 and "norm" not in name:
                p.normal_(0.0, 0.05)  # qkv biases (Qwen2)
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = bos
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
