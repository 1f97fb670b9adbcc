"""The wire schema of protocol v1 (pydantic v2): job, params, events, results, and their parsers.

Jobs are validated strictly (no "5" -> 5, no bools as ints, unknown fields rejected); events are read
leniently (unknown fields ignored) so that a newer worker can add fields without breaking older clients."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

MAX_TOKENS_CAP = 1_000_000  # upper bound on params.max_tokens: far above any context, below int overflow
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32 on the GPU
MAX_STOP_STRINGS = 64
MAX_RESULT_TTL_S = 30 * 24 * 3600  # 30 days
MAX_JOB_ID_LEN = 256
MAX_CHOICES = 256
MAX_LABEL_LEN = 256  # Job.user, Job.api_key_id
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"  # safe inside a Redis key and a URL path segment
DEFAULT_MAX_JOB_BYTES = 1 << 20
_ID_PARSE_LIMIT_BYTES = 64 << 20  # over this, an over-size payload is not parsed just to find its id

ERROR_CODES = ("invalid_request", "too_long", "expired", "overloaded", "internal")
FINISH_REASONS = ("stop", "length", "cancelled")
ErrorCode = Literal["invalid_request", "too_long", "expired", "overloaded", "internal"]
FinishReason = Literal["stop", "length", "cancelled"]

JobId = Annotated[str, Field(min_length=1, max_length=MAX_JOB_ID_LEN, pattern=JOB_ID_PATTERN)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_LENIENT = ConfigDict(extra="ignore")


class JsonSchemaSpec(BaseModel):
    """`response_format.json_schema`, as OpenAI's API spells it."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow BaseModel.schema(): the attribute is schema_, the JSON key "schema".
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # accepted for OpenAI compatibility; the output always follows the schema


class ResponseFormat(BaseModel):
    """`params.response_format`: `text` (no constraint), `json_object` (any JSON object) or
    `json_schema` (an object that validates against `json_schema.schema`)."""

    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only there")
        return self


class Params(BaseModel):
    """Sampling parameters; every field optional (None: the engine default). Bounds match
    engine/sampling_params.py so that a job that validates here never fails in the engine."""

    model_config = _STRICT

    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0.0)  # 0 means greedy
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1 disables
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # Structured outputs (at most one): the output follows a JSON schema / is a JSON object, matches
    # a regex, or is one of the choices.
    response_format: ResponseFormat | None = None
    regex: str | None = Field(default=None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1,
                                                                      max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _one_structured_output(self) -> Params:
        given = [name for name in ("response_format", "regex", "choice") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of response_format, regex, choice (found: {', '.join(given)})")
        return self

    def structured_output(self) -> dict[str, str] | None:
        """The grammar asked for, as engine.StructuredOutputParams fields (kind, spec), or None."""
        if self.regex is not None:
            return {"kind": "regex", "spec": self.regex}
        if self.choice is not None:
            return {"kind": "choice", "spec": json.dumps(self.choice, ensure_ascii=False)}
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.json_schema is None:
            return {"kind": "json_object", "spec": ""}
        # Key order kept: the output lists properties in the schema's order.
        return {"kind": "json_schema", "spec": json.dumps(fmt.json_schema.schema_, separators=(",", ":"))}

    def sampling_kwargs(self) -> dict[str, Any]:
        """The fields that were set, as keyword arguments for engine.SamplingParams."""
        kwargs = self.model_dump(exclude_none=True, exclude={"response_format", "regex", "choice"})
        structured_output = self.structured_output()
        if structured_output is not None:
            kwargs["structured_output"] = structured_output
        return kwargs


class Message(BaseModel):
    """One chat message, rendered with the tokenizer's chat template."""

    model_config = _STRICT

    role: str = Field(min_length=1)
    content: str


class Job(BaseModel):
    """One generation job: the JSON object in field `job` of a `{p}:jobs` entry."""

    model_config = _STRICT

    id: JobId | None = None
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt_token_ids: list[TokenId] | None = Field(default=None, min_length=1)
    params: Params = Field(default_factory=Params)
    # The priority class (protocol v1.1): names the stream the job is queued on (api_client.keys.LANES);
    # unset means interactive, the {p}:jobs lane. The worker schedules by the stream it read the job from.
    lane: Literal["interactive", "batch"] | None = None
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)  # lower runs first, within a lane
    deadline_ms: int | None = Field(default=None, ge=0, le=2**63 - 1)  # epoch milliseconds
    result_ttl_s: int | None = Field(default=None, ge=1, le=MAX_RESULT_TTL_S)
    # Who sent it, for accounting and logs; the worker does not act on them.
    user: str | None = Field(default=None, max_length=MAX_LABEL_LEN)  # the end user (OpenAI's `user`)
    api_key_id: str | None = Field(default=None, max_length=MAX_LABEL_LEN)  # the gateway key's name, never the key

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> Job:
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids (found: {found})")
        return self

    def to_json(self) -> str:
        """The wire form: unset optional fields left out."""
        return self.model_dump_json(exclude_none=True, by_alias=True)


class JobError(ValueError):
    """A job payload that cannot be served. `job_id` is set when the id could still be read, so the
    worker can write an error event to that job's result stream."""

    def __init__(self, code: ErrorCode, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"JobError(code={self.code!r}, message={self.message!r}, job_id={self.job_id!r})"


class Usage(BaseModel):
    model_config = _LENIENT

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class TokenEvent(BaseModel):
    """A delta: `index` is the position of token_ids[0] among the completion's tokens."""

    model_config = _LENIENT

    type: Literal["token"] = "token"
    index: int = Field(ge=0)
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None  # per token in token_ids, when params.logprobs is set

    @property
    def is_final(self) -> bool:
        return False


class DoneEvent(BaseModel):
    """The last event of a served job: the whole completion."""

    model_config = _LENIENT

    type: Literal["done"] = "done"
    finish_reason: FinishReason
    text: str
    token_ids: list[int]
    usage: Usage

    @property
    def is_final(self) -> bool:
        return True


class ErrorEvent(BaseModel):
    """The last event of a job that could not be served."""

    model_config = _LENIENT

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str

    @property
    def is_final(self) -> bool:
        return True


Event = Annotated[Union[TokenEvent, DoneEvent, ErrorEvent], Field(discriminator="type")]  # noqa: UP007
_EVENT_ADAPTER: TypeAdapter[TokenEvent | DoneEvent | ErrorEvent] = TypeAdapter(Event)


class Completion(BaseModel):
    """The result of a served job, as `Client.result` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage

    @classmethod
    def from_done(cls, event: DoneEvent) -> Completion:
        return cls(text=event.text, token_ids=event.token_ids, finish_reason=event.finish_reason,
                   usage=event.usage)


def parse_event(raw: bytes | str) -> TokenEvent | DoneEvent | ErrorEvent:
    """One event from the `event` field of a result-stream entry. Raises ValueError when malformed."""
    try:
        return _EVENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise ValueError(f"malformed event: {validation_message(exc)}") from None


def dump_event(event: TokenEvent | DoneEvent | ErrorEvent) -> str:
    """The wire form of an event (unset optional fields left out)."""
    return event.model_dump_json(exclude_none=True)


def parse_job(raw: bytes | str, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES) -> Job:
    """Validate one job payload. Raises JobError (code, short message, job_id when readable)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_job_bytes:
        job_id = _read_id(data) if len(data) <= _ID_PARSE_LIMIT_BYTES else None
        raise JobError("too_long", f"job is {len(data)} bytes, over the limit of {max_job_bytes}", job_id)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError("invalid_request", f"job is not valid UTF-8 (byte {exc.start})", _read_id(data)) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise JobError("invalid_request", str(exc), _read_id(data)) from None
    except ValueError as exc:  # json.JSONDecodeError, and int strings over Python's digit limit
        raise JobError("invalid_request", f"job is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise JobError("invalid_request", f"job must be a JSON object, got {type(obj).__name__}")
    job_id = _valid_id(obj.get("id"))
    try:
        return Job.model_validate(obj)
    except ValidationError as exc:
        raise JobError("invalid_request", validation_message(exc), job_id) from None


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a doubled "prompt" must be an error, not a guess.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(f"duplicate key {key!r} in job")
        obj[key] = value
    return obj


def _valid_id(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_JOB_ID_LEN and re.match(JOB_ID_PATTERN, value):
        return value
    return None


def _read_id(data: bytes) -> str | None:
    """Best effort: the top-level id of a payload rejected for another reason, or None."""
    try:
        obj = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return _valid_id(obj.get("id")) if isinstance(obj, dict) else None


def validation_message(exc: ValidationError) -> str:
    """pydantic's first error as one short line: "location: message (got type)"."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"].endswith("_type"):  # "Input should be a valid integer": say what came instead
        msg += f" (got {type(err['input']).__name__})"
    return f"{loc}: {msg}" if loc else msg
