"""IncrementalDetokenizer: one request's output token ids -> text deltas that never change once sent.

Owns the decoding window, the held-back tail (partial UTF-8 characters, possible stop-string starts)
and the stop-string match."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded ahead of the output so the first output token reads as it does in context
# (SentencePiece drops the leading space of the first token of a decode).
NUM_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output tokens into final text, a delta per update().

    Decoding is windowed (per update it costs O(tokens since the second-to-last clean boundary), not
    O(output)): the window is `prefix` tokens whose text is already known (`_prefix_text`) followed by
    the pending tokens read since. A boundary is clean when the window's text does not end in U+FFFD,
    i.e. no partial multi-byte character is open there. Characters up to the last one that is not a
    trailing U+FFFD are final and go to the stop-string stage, which holds back any suffix that could
    still start a stop string. The window only grows while consecutive tokens keep the text ending in
    U+FFFD (a character still open, or invalid bytes): a few tokens for real text.

    For byte-level BPE, deltas + flush() add up to tokenizer.decode(output ids); with SentencePiece-style
    decoders the first token keeps the leading space it has after the prompt."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        initial_output_token_ids: Sequence[int] = (),
    ) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer
        # A fast tokenizer's decode without clean-up is exactly its Rust backend's decode.
        self._backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        self.stop = list(stop)
        self.skip_special_tokens = skip_special_tokens
        self.stopped = False  # a stop string matched: the rest of the output is dropped
        self._is_flushed = False
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._output_pieces: list[str] = []

        context = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: decoding the output after it would glue the output's
            # first bytes onto it, and the output text would no longer be the output ids' own text.
            context, context_text = [], ""
        self._window_ids = context
        self._num_prefix_ids = len(context)  # window_ids[:num_prefix_ids] decode to _prefix_text
        self._prefix_text = context_text
        self._num_pending_chars_passed = 0  # chars of the pending tokens' text already final
        self._held_text = ""  # final text held back: it may be the start of a stop string

        if initial_output_token_ids:
            # A resumed job: the state is exactly that of a detokenizer that saw these tokens in one
            # update (text still held back then is sent later), their delta counted but not returned.
            self.update(initial_output_token_ids)

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of every delta returned)."""
        if len(self._output_pieces) > 1:
            self._output_pieces = ["".join(self._output_pieces)]
        return self._output_pieces[0] if self._output_pieces else ""

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Take the newly sampled tokens; return the text that became final (possibly "")."""
        assert not self._is_flushed, "update() after flush(): the request already finished"
        if self.stopped or not new_token_ids:
            return ""
        self._window_ids.extend(new_token_ids)
        pending_text = self._decode(self._window_ids)[len(self._prefix_text):]
        num_final_chars = len(pending_text.rstrip(_REPLACEMENT_CHAR))
        new_text = pending_text[self._num_pending_chars_passed:num_final_chars]
        if num_final_chars == len(pending_text):
            self._advance_window()
        else:
            self._num_pending_chars_passed = max(num_final_chars, self._num_pending_chars_passed)
        return self._emit(new_text, is_last=False)

    def flush(self) -> str:
        """The request ended for another reason (EOS, length, abort): release everything held back.

        That is text that could have started a stop string (never a stop string itself) and a trailing
        partial character as the tokenizer decodes it (U+FFFD)."""
        if self._is_flushed or self.stopped:
            self._is_flushed = True
            return ""
        pending_text = self._decode(self._window_ids)[len(self._prefix_text):]
        self._is_flushed = True
        return self._emit(pending_text[self._num_pending_chars_passed:], is_last=True)

    def _advance_window(self) -> None:
        # The window's end is a clean boundary: the pending tokens become the next prefix, and tokens
        # before them are no longer needed as context.
        self._window_ids = self._window_ids[self._num_prefix_ids:]
        self._num_prefix_ids = len(self._window_ids)
        self._prefix_text = self._decode(self._window_ids)
        self._num_pending_chars_passed = 0

    def _emit(self, new_text: str, is_last: bool) -> str:
        """Stop-string stage: final text in, text safe to send out."""
        if not self.stop:
            self._output_pieces.append(new_text)
            return new_text
        text = self._held_text + new_text
        # The held text holds no whole stop string (it would have matched last time) and any match
        # starts inside it or later, so the earliest find() here is the first occurrence overall.
        match_starts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if match_starts:
            self.stopped = True
            delta, self._held_text = text[:min(match_starts)], ""
        else:
            num_held = 0 if is_last else self._num_possible_stop_start_chars(text)
            delta, self._held_text = text[:len(text) - num_held], text[len(text) - num_held:]
        self._output_pieces.append(delta)
        return delta

    def _num_possible_stop_start_chars(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_stop_len - 1), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0

    def _decode(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        # No clean-up of tokenization spaces (" ." -> "."): it rewrites text across window boundaries,
        # which would make already-sent text wrong.
        if self._backend is not None:  # the Rust tokenizer directly: ~5x less per call than .decode()
            return self._backend.decode(list(token_ids), skip_special_tokens=self.skip_special_tokens)
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)
        assert isinstance(text, str)
        return text
