"""Prompt encoding (text, chat messages, raw ids), its user errors, and the EOS id set of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InvalidRequestError
from engine.tokenizer import encode_prompt, eos_token_ids, load_tokenizer
from tests.helpers.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture()
def saved_tokenizer_dir(tmp_path: Path, tokenizer: Any) -> Path:
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_prompt_encodes_like_the_tokenizer(tokenizer: Any) -> None:
    text = "Hello world! 日本語 🚀"
    ids = encode_prompt(tokenizer, prompt=text)
    assert ids == tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_messages_render_with_the_chat_template(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    ids = encode_prompt(tokenizer, messages=messages)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert ids == list(expected["input_ids"] if not isinstance(expected, list) else expected)
    # The generation prompt is there: the model is asked to answer as the assistant.
    assert tokenizer.decode(ids) == "<|system|>Be brief.<|end|><|user|>Capital of France?<|end|><|assistant|>"


def test_prompt_token_ids_are_checked_against_the_vocab(tokenizer: Any) -> None:
    assert encode_prompt(tokenizer, prompt_token_ids=[5, 0, len(tokenizer) - 1]) == [5, 0, len(tokenizer) - 1]
    with pytest.raises(InvalidRequestError, match=rf"prompt_token_ids\[1\] = {len(tokenizer)}"):
        encode_prompt(tokenizer, prompt_token_ids=[5, len(tokenizer)])
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids\[0\] = -1"):
        encode_prompt(tokenizer, prompt_token_ids=[-1])
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids\[1\] must be an int"):
        encode_prompt(tokenizer, prompt_token_ids=[5, True])
    with pytest.raises(InvalidRequestError, match="must be a list of ints"):
        encode_prompt(tokenizer, prompt_token_ids="1 2 3")  # type: ignore[arg-type]
    # The model's vocab (padded embeddings) may be larger than the tokenizer's.
    assert encode_prompt(tokenizer, prompt_token_ids=[len(tokenizer) + 3], vocab_size=len(tokenizer) + 8) == [
        len(tokenizer) + 3]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({}, "none of them"),
        ({"prompt": "hi", "prompt_token_ids": [1]}, "prompt, prompt_token_ids"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "prompt, messages"),
    ],
)
def test_exactly_one_prompt_field(tokenizer: Any, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"exactly one.*got {named}"):
        encode_prompt(tokenizer, **kwargs)


@pytest.mark.parametrize("kwargs", [{"prompt": ""}, {"prompt_token_ids": []}])
def test_empty_prompt_is_rejected(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        encode_prompt(tokenizer, **kwargs)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ({"role": "user", "content": "hi"}, "non-empty list"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"role": "user"}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], r"messages\[1\]\.role must be a string"),
    ],
)
def test_bad_messages_are_rejected(tokenizer: Any, messages: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        encode_prompt(tokenizer, messages=messages)


def test_messages_without_a_chat_template(tokenizer: Any) -> None:
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(InvalidRequestError, match="has no chat template"):
        encode_prompt(bare, messages=[{"role": "user", "content": "hi"}])
    assert tokenizer.chat_template  # the shared one is untouched


def test_a_template_that_rejects_the_messages_is_a_request_error() -> None:
    strict = build_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'user' %}"
        "{{ raise_exception('only user messages are supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(InvalidRequestError, match="only user messages"):
        encode_prompt(strict, messages=[{"role": "tool", "content": "x"}])


def test_load_tokenizer_from_a_local_dir(saved_tokenizer_dir: Path, tokenizer: Any) -> None:
    loaded = load_tokenizer(str(saved_tokenizer_dir))
    text = "Grüße 🚀 <|end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template


@pytest.mark.parametrize(("generation_eos", "expected_extra"), [(None, set()), (7, {7}), ([7, 9], {7, 9})])
def test_eos_token_ids_union(saved_tokenizer_dir: Path, tokenizer: Any, generation_eos: Any,
                             expected_extra: set[int]) -> None:
    if generation_eos is not None:
        (saved_tokenizer_dir / "generation_config.json").write_text(
            json.dumps({"eos_token_id": generation_eos, "bos_token_id": 0}))
    eos = eos_token_ids(saved_tokenizer_dir, tokenizer)
    assert isinstance(eos, frozenset)
    assert eos == {tokenizer.eos_token_id} | expected_extra


def test_eos_token_ids_without_a_tokenizer_eos(saved_tokenizer_dir: Path) -> None:
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    assert eos_token_ids(saved_tokenizer_dir, no_eos) == frozenset()
    (saved_tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    assert eos_token_ids(saved_tokenizer_dir, no_eos) == frozenset({2, 4})
