"""Errors a caller can act on. Each maps to a wire-protocol error code (the worker reads `.code`)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request itself is bad (empty prompt, two prompt fields, bad params): fix the request."""

    code = "invalid_request"


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus resumed tokens) does not fit in max_model_len, or needs more KV than exists."""

    code = "too_long"


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one we implement, or its weights are missing."""

    code = "internal"
