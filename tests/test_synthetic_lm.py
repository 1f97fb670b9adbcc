"""bench/synthetic_lm.py: the trained checkpoint behind the bf16 correctness check learns its language
(peaked, predictable next tokens), and our engine continues its texts exactly as HF does (fp32, CPU)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from bench.synthetic_lm import make_language, train
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from tests.helpers.tiny_models import make_tiny_model


def test_language_is_deterministic_after_its_first_phrase() -> None:
    language = make_language(3, 300)
    assert sorted(language.successor(k) for k in range(64)) == list(range(64))  # a bijection
    text = language.text(200, random.Random(1))
    assert len(text) == 200 and all(3 <= t < 300 for t in text)


def test_trained_model_is_confident_and_we_match_hf(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model("llama", tmp_path / "m", hidden_size=128, intermediate_size=256,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512)
    language = make_language(3, 300)
    fit = train(model_dir, language, steps=60, batch_size=8, seq_len=128, device="cpu")
    assert fit["accuracy"] > 0.9
    rng = random.Random(2)
    prompts = [language.text(rng.randint(32, 100), rng) for _ in range(4)]
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128, max_num_seqs=4))
    ours = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == out[0, len(prompt):].tolist()
