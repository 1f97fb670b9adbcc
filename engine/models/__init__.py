"""Our model implementations and the registry from an HF `architectures` name to the class serving it.

Every class has `from_hf_config(hf_config)`, `forward(input_ids, positions, attn_metadata)`,
`compute_logits(hidden)` and a `packed_modules_mapping` the loader uses."""

from __future__ import annotations

from typing import Any

from engine.errors import UnsupportedModelError
from engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise UnsupportedModelError(
        f"model architecture {architectures or 'unknown (config.json has no architectures)'} is not "
        f"supported; supported architectures: {', '.join(sorted(MODEL_REGISTRY))}")


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "get_model_class"]
