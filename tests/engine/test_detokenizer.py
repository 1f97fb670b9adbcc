"""IncrementalDetokenizer: deltas that add up to the full decode, whole characters only, stop strings
cut exactly, resumed jobs, and a decoding cost that does not grow with the output."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from engine.detokenizer import IncrementalDetokenizer
from tests.helpers.tiny_models import build_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストも少し。Emoji too: 🚀🔥✨ and numbers 0123456789.",
    "Grüße aus München, ça va? 👩‍💻 漢字 ok\n    return 42\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def feed(detok: IncrementalDetokenizer, token_ids: Sequence[int], rng: random.Random) -> list[str]:
    """Push token_ids through update() in random-sized groups (0 to 4 tokens); return every delta."""
    deltas, i = [], 0
    while i < len(token_ids):
        n = rng.randint(0, 4)
        deltas.append(detok.update(token_ids[i:i + n]))
        i += n
    return deltas


def test_the_tiny_tokenizer_splits_characters(tokenizer: Any) -> None:
    # What the tests below rely on: single tokens of these texts decode to partial characters.
    ids = tokenizer(TEXTS[1])["input_ids"]
    assert any(tokenizer.decode([t]) == "\ufffd" for t in ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_random_token_sequences_add_up_to_the_full_decode(tokenizer: Any, seed: int,
                                                          skip_special_tokens: bool) -> None:
    rng = random.Random(seed)
    prompt_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 8))]
    output_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 60))]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = feed(detok, output_ids, rng)
    deltas.append(detok.flush())
    expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == detok.output_text == expected
    assert not detok.stopped


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", range(10))
def test_multibyte_characters_are_never_split(tokenizer: Any, text: str, seed: int) -> None:
    rng = random.Random(seed)
    output_ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Say:")["input_ids"])
    deltas = feed(detok, output_ids, rng)
    assert all("\ufffd" not in d for d in deltas)
    # Text that ends in whole characters needs no flush: it was all emitted by update().
    assert "".join(deltas) == detok.output_text == text
    assert detok.flush() == ""


def test_a_partial_character_is_held_until_complete(tokenizer: Any) -> None:
    ids = tokenizer("ok🚀")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [5])
    deltas = [detok.update([t]) for t in ids]
    assert tokenizer.decode(ids[-1:]) == "\ufffd"  # the rocket's last byte is its own token
    assert deltas[-1].endswith("🚀") and "".join(deltas) == "ok🚀"
    # Ended mid-character for another reason: flush gives what the tokenizer makes of the bytes.
    detok = IncrementalDetokenizer(tokenizer, [5])
    assert "".join(detok.update([t]) for t in ids[:-1]) == "ok"
    assert detok.flush() == tokenizer.decode(ids[:-1])[2:] and detok.output_text == tokenizer.decode(ids[:-1])


def test_a_prompt_ending_mid_character_does_not_merge_into_the_output(tokenizer: Any) -> None:
    ids = tokenizer("日本")["input_ids"]
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, ids[:split])
    text = "".join(detok.update([t]) for t in ids[split:]) + detok.flush()
    assert text == tokenizer.decode(ids[split:])


@pytest.mark.parametrize("seed", range(20))
def test_stop_string_across_tokens_is_cut_at_its_first_occurrence(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    text = rng.choice(TEXTS) * 2
    ids = tokenizer(text)["input_ids"]
    start = rng.randrange(len(text) // 2)
    stop = text[start:start + rng.randint(1, 6)]
    detok = IncrementalDetokenizer(tokenizer, [5], stop=["never there", stop])
    deltas = feed(detok, ids, rng)
    assert detok.stopped
    assert "".join(deltas) == detok.output_text == text[:text.find(stop)]
    assert detok.update(ids[:3]) == "" and detok.flush() == ""


def test_stop_string_spanning_a_token_boundary(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    stop = "fox j"
    assert not any(stop in p for p in pieces)  # no single token holds it
    detok = IncrementalDetokenizer(tokenizer, [5], stop=[stop])
    deltas = [detok.update([t]) for t in ids]
    assert detok.stopped and "".join(deltas) == "The quick brown "


def test_held_back_partial_match_is_released_when_it_does_not_match(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [5], stop=["fox x", "dog!"])
    emitted = []
    for t in ids:
        detok.update([t])
        emitted.append(detok.output_text)
    decoded = [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
    num_held = 0
    for sent, so_far in zip(emitted, decoded, strict=True):
        assert so_far.startswith(sent)
        if so_far.endswith(("fox", "fox ", "dog")):  # could still become a stop string: not sent yet
            assert sent == so_far[:max(so_far.rfind("fox"), so_far.rfind("dog"))]
            num_held += 1
    assert num_held >= 2
    # "fox j" and "dog." turned out not to match: everything was released without a flush.
    assert not detok.stopped and detok.output_text == text and detok.flush() == ""


def test_flush_releases_a_possible_stop_start_but_never_a_stop_string(tokenizer: Any) -> None:
    ids = tokenizer("over the lazy do")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [5], stop=["dog"])
    assert detok.update(ids) == "over the lazy "
    assert detok.flush() == "do" and detok.output_text == "over the lazy do"


def test_the_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [5], stop=["lazy", "quick", "brown"])
    assert detok.update(ids) == "The " and detok.stopped


def test_stop_string_equal_to_the_whole_first_token(tokenizer: Any) -> None:
    ids = tokenizer("Hello world")["input_ids"]
    first = tokenizer.decode(ids[:1])
    assert len(first) > 1
    for groups in ([ids], [ids[:1], ids[1:]]):
        detok = IncrementalDetokenizer(tokenizer, [5], stop=[first])
        assert [detok.update(g) for g in groups] == [""] * len(groups)
        assert detok.stopped and detok.output_text == ""


@pytest.mark.parametrize("seed", range(15))
def test_resumed_detokenizer_continues_like_an_uninterrupted_one(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    text = rng.choice(TEXTS)
    ids = tokenizer(text)["input_ids"]
    prompt = tokenizer("Say:")["input_ids"]
    stop = ["fox x", "テキストx"]  # held back on the way but never matched
    split = rng.randrange(len(ids) + 1)  # may fall inside a character or a possible stop start
    later_groups = []
    i = split
    while i < len(ids):
        n = rng.randint(1, 4)
        later_groups.append(ids[i:i + n])
        i += n
    uninterrupted = IncrementalDetokenizer(tokenizer, prompt, stop=stop)
    before = uninterrupted.update(ids[:split])
    resumed = IncrementalDetokenizer(tokenizer, prompt, stop=stop, initial_output_token_ids=ids[:split])
    assert resumed.output_text == before  # counted as already emitted
    later = [resumed.update(g) for g in later_groups] + [resumed.flush()]
    assert later == [uninterrupted.update(g) for g in later_groups] + [uninterrupted.flush()]
    assert resumed.output_text == text


def test_resumed_past_a_stop_string_is_stopped(tokenizer: Any) -> None:
    ids = tokenizer("The quick brown fox")["input_ids"]
    resumed = IncrementalDetokenizer(tokenizer, [5], stop=["brown"], initial_output_token_ids=ids)
    assert resumed.stopped and resumed.output_text == "The quick "
    assert resumed.update(ids[:2]) == ""


class _CountingTokenizer:
    """Delegates to a real tokenizer and records how many ids each decode() was asked for."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decode_lengths: list[int] = []

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        self.decode_lengths.append(len(token_ids))
        return str(self.tokenizer.decode(token_ids, **kwargs))


def test_decode_cost_does_not_grow_with_the_output(tokenizer: Any) -> None:
    counting = _CountingTokenizer(tokenizer)
    text = " ".join(TEXTS) * 8
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 600
    detok = IncrementalDetokenizer(counting, tokenizer("Say:")["input_ids"], stop=["never there"])  # type: ignore[arg-type]
    out = "".join(detok.update([t]) for t in ids)
    assert out == text
    # A window of a few tokens (the longest partial character here is 4 byte tokens), not the output.
    assert max(counting.decode_lengths) <= 10


def test_prompt_context_keeps_the_first_tokens_leading_space() -> None:
    # A SentencePiece-style decoder drops the leading space of a decode's first token; decoded after
    # the prompt's last tokens, the first output token reads as it does in context.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁Say": 1, "▁hello": 2, "▁world": 3, "!": 4}
    sp = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    metaspace = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert metaspace.decode([3, 4]) == "world!"
    detok = IncrementalDetokenizer(metaspace, [1])
    assert [detok.update([t]) for t in (3, 4, 2)] == [" world", "!", " hello"]
    assert detok.output_text == " world! hello"
