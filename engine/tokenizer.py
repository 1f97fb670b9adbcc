"""Prompt encoding: a text prompt, chat messages (the tokenizer's chat template) or raw token ids -> ids.

Also owns which token ids end generation (EOS) for a checkpoint. Every user error is an InvalidRequestError."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_tokenizer(model: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer from a local directory (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model), local_files_only=True)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """Exactly one of `prompt`, `messages`, `prompt_token_ids` -> the prompt's token ids.

    `vocab_size` bounds raw ids (pass the model's, which may exceed the tokenizer's: padded embeddings);
    it defaults to len(tokenizer)."""
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("prompt_token_ids", prompt_token_ids)) if value is not None]
    if len(given) != 1:
        what = ", ".join(given) if given else "none of them"
        raise InvalidRequestError(
            f"give exactly one of prompt, messages or prompt_token_ids (got {what})")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}")
        token_ids = list(tokenizer(prompt)["input_ids"])
    elif messages is not None:
        token_ids = _apply_chat_template(tokenizer, messages)
    else:
        assert prompt_token_ids is not None
        token_ids = _check_token_ids(prompt_token_ids, len(tokenizer) if vocab_size is None else vocab_size)
    if not token_ids:
        raise InvalidRequestError(f"the prompt is empty (given as {given[0]}): send at least one token")
    return token_ids


def _apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with string role and content, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidRequestError(f"messages[{i}].{key} must be a string, got {message.get(key)!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "this model's tokenizer has no chat template: send `prompt` or `prompt_token_ids` instead")
    from jinja2 import TemplateError

    try:
        rendered: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except TemplateError as exc:  # e.g. raise_exception('roles must alternate') inside the template
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
    # transformers 5 returns a BatchEncoding (return_dict=True by default); 4.x returned a list.
    token_ids: Any = rendered if isinstance(rendered, list) else rendered["input_ids"]
    return [int(t) for t in token_ids]


def _check_token_ids(prompt_token_ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise InvalidRequestError(
            f"prompt_token_ids must be a list of ints, got {type(prompt_token_ids).__name__}")
    for i, token_id in enumerate(prompt_token_ids):
        # bool is an int subclass; a JSON true in a token list is a client bug, not token 1.
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise InvalidRequestError(f"prompt_token_ids[{i}] must be an int, got {token_id!r}")
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"prompt_token_ids[{i}] = {token_id} is out of range: ids must be in [0, {vocab_size})")
    return list(prompt_token_ids)


def eos_token_ids(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that end generation: generation_config.json's eos_token_id (int or list) | tokenizer.eos_token_id.

    Instruct checkpoints (Llama 3, Qwen) list several there (<|eot_id|>, <|im_end|>) that the tokenizer
    alone does not know about."""
    eos: set[int] = set()
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list):
            eos.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    if not eos:
        logger.warning("model=%s has no eos_token_id: requests end only by max_tokens or stop", model_dir)
    return frozenset(eos)
