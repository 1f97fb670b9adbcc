"""OpenAI response bodies and stream chunks, built from tokenrelay events.

The gateway has no tokenizer, so a logprob's `token` is spelt `token_id:<id>` (vLLM's
`return_tokens_as_token_ids` form); the text itself comes from the worker's events."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from api_client.schema import DoneEvent, TokenEvent

Kind = Literal["chat", "completion"]
# tokenrelay's finish reasons in OpenAI's words; a cancelled job stopped early, on request.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


def token_name(token_id: int) -> str:
    return f"token_id:{token_id}"


@dataclass
class Choice:
    """What one job has produced so far."""

    index: int
    text: str = ""  # streamed so far (or the whole completion once done)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0

    def add_tokens(self, event: TokenEvent) -> str:
        """Take a token event; returns its text delta."""
        self.token_ids += event.token_ids
        if event.logprobs:
            self.logprobs += event.logprobs
        self.text += event.text
        return event.text

    def finish(self, event: DoneEvent) -> str:
        """Take the done event; returns the text not streamed yet (the done event holds it all)."""
        rest = event.text[len(self.text):] if event.text.startswith(self.text) else ""
        self.text = event.text
        self.token_ids = list(event.token_ids)
        self.finish_reason = FINISH_REASONS[event.finish_reason]
        self.prompt_tokens = event.usage.prompt_tokens
        return rest


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], num_top: int) -> dict[str, Any]:
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        top = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
        content.append({"token": token_name(token_id), "logprob": entry.get(token_id, float("-inf")),
                        "bytes": None, "top_logprobs": [
                            {"token": token_name(t), "logprob": lp, "bytes": None} for t, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], num_top: int) -> dict[str, Any]:
    pairs = list(zip(token_ids, logprobs, strict=False))
    return {"tokens": [token_name(t) for t, _ in pairs],
            "token_logprobs": [entry.get(t, float("-inf")) for t, entry in pairs],
            "top_logprobs": [dict((token_name(k), v) for k, v in
                                  sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:num_top])
                             for _, entry in pairs],
            "text_offset": None}


class ResponseBuilder:
    """Bodies and chunks of one request, whose id, model and creation time they share."""

    def __init__(self, kind: Kind, response_id: str, model: str, num_logprobs: int | None) -> None:
        self.kind = kind
        self.id = response_id
        self.model = model
        self.num_logprobs = num_logprobs  # None: logprobs not asked for
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict[str, Any] | None:
        if self.num_logprobs is None:
            return None
        build = chat_logprobs if self.kind == "chat" else completion_logprobs
        return build(token_ids, logprobs, self.num_logprobs)

    @staticmethod
    def usage(choices: list[Choice], prompt_tokens: int) -> dict[str, int]:
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        rows = []
        for c in choices:
            logprobs = self._logprobs(c.token_ids, c.logprobs)
            if self.kind == "chat":
                rows.append({"index": c.index, "message": {"role": "assistant", "content": c.text,
                                                           "refusal": None, "tool_calls": []},
                             "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                rows.append({"index": c.index, "text": c.text, "logprobs": logprobs,
                             "finish_reason": c.finish_reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": rows, "usage": self.usage(choices, prompt_tokens), "system_fingerprint": None}

    def chunk(self, index: int, *, text: str | None = None, role: bool = False,
              token_ids: list[int] | None = None, logprobs: list[dict[int, float]] | None = None,
              finish_reason: str | None = None, with_usage_field: bool = False) -> str:
        """One SSE `data:` line for one choice."""
        row: dict[str, Any]
        lp = self._logprobs(token_ids or [], logprobs or []) if logprobs else None
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            row = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            row = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {"id": self.id, "object": f"{self.object}.chunk" if self.kind == "chat"
                                 else self.object, "created": self.created, "model": self.model,
                                 "choices": [row], "system_fingerprint": None}
        if with_usage_field:  # include_usage: every chunk has "usage": null but the last one
            chunk["usage"] = None
        return sse(chunk)

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> str:
        return sse({"id": self.id, "object": f"{self.object}.chunk" if self.kind == "chat" else self.object,
                    "created": self.created, "model": self.model, "choices": [],
                    "usage": self.usage(choices, prompt_tokens), "system_fingerprint": None})


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
