"""OpenAI request bodies (chat completions, completions) and their translation into tokenrelay jobs.

Unknown fields are rejected, so a client never believes a parameter was honoured when it was not:
the error names the field. tokenrelay's own sampling knobs (`top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`, `regex`, `choice`, `priority`) are accepted too (the SDK's extra_body)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api_client.schema import MAX_STOP_STRINGS, MAX_TOKENS_CAP, Job, ResponseFormat

MAX_N = 16  # completions per request: each is a job

_FORBID = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _FORBID

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = _FORBID

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _FORBID

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted; chat templates do not render it

    def as_job_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _CommonRequest(BaseModel):
    model_config = _FORBID

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = Field(default=None, max_length=256)
    response_format: ResponseFormat | None = None
    # tokenrelay's own (extra_body)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool | None = None
    regex: str | None = Field(default=None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return None

    def jobs(self, default_max_tokens: int | None, api_key_id: str | None) -> tuple[str, list[Job]]:
        """The response id and one job per choice (ValueError / ValidationError: a 400)."""
        raise NotImplementedError

    def params(self, default_max_tokens: int | None) -> dict[str, Any]:
        """The job params shared by every choice (the seed is set per choice)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        params: dict[str, Any] = {
            # No max_tokens from the client: until EOS or the end of the context, as OpenAI does.
            "max_tokens": self._max_tokens() or default_max_tokens or MAX_TOKENS_CAP,
            "temperature": self.temperature, "top_p": self.top_p, "stop": stop or None,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos, "regex": self.regex,
            "choice": self.choice, "logprobs": self.num_logprobs(),
        }
        if self.response_format is not None and self.response_format.type != "text":
            params["response_format"] = self.response_format.model_dump(exclude_none=True, by_alias=True)
        return {k: v for k, v in params.items() if v is not None}

    def _jobs(self, base_id: str, prompts: list[dict[str, Any]], default_max_tokens: int | None,
              api_key_id: str | None) -> list[Job]:
        params = self.params(default_max_tokens)
        if self.stop is not None and len(params.get("stop", [])) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings")
        jobs: list[Job] = []
        num = len(prompts) * self.n
        for i in range(num):
            prompt = prompts[i // self.n]
            k = i % self.n
            choice_params = dict(params)
            if self.seed is not None:
                # n choices of one seeded request must differ from each other, and reproduce.
                choice_params["seed"] = (self.seed + k) & (2**63 - 1)
            jobs.append(Job.model_validate({
                "id": base_id if num == 1 else f"{base_id}.{i}", **prompt, "params": choice_params,
                "priority": self.priority, "user": self.user, "api_key_id": api_key_id}))
        return jobs


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def jobs(self, default_max_tokens: int | None, api_key_id: str | None) -> tuple[str, list[Job]]:
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        messages = {"messages": [m.as_job_message() for m in self.messages]}
        return base_id, self._jobs(base_id, [messages], default_max_tokens, api_key_id)


class CompletionRequest(_CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[dict[str, Any]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [{"prompt": prompt}]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [{"prompt_token_ids": prompt}]
        return [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]

    def jobs(self, default_max_tokens: int | None, api_key_id: str | None) -> tuple[str, list[Job]]:
        base_id = f"cmpl-{uuid.uuid4().hex}"
        prompts = self.prompts()
        if len(prompts) * self.n > MAX_N:
            raise ValueError(f"prompt: at most {MAX_N} completions per request (prompts x n)")
        return base_id, self._jobs(base_id, prompts, default_max_tokens, api_key_id)
