"""Client: the synchronous producer API (redis-py): submit jobs, stream / poll / wait for results, cancel.

Also the pieces AsyncClient shares: job building, entry decoding, JobFailed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis
from pydantic import ValidationError

from api_client.keys import EVENT_FIELD, JOB_FIELD, Keys
from api_client.schema import (
    Completion,
    DoneEvent,
    ErrorEvent,
    Job,
    JobError,
    Message,
    TokenEvent,
    parse_event,
    validation_message,
)

logger = logging.getLogger(__name__)

EventT = TokenEvent | DoneEvent | ErrorEvent
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
BLOCK_MS = 1000  # XREAD BLOCK per call: well under socket_timeout so a healthy wait never times out
READ_COUNT = 256  # entries per XREAD / XRANGE call
DEFAULT_SOCKET_TIMEOUT_S = 10.0
CANCEL_TTL_S = 3600  # a cancel key outlives any job that could still read it
RECONNECT_TIMEOUT_S = 30.0  # give up when Redis stays unreachable this long (without a stream timeout)
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError)


class JobFailed(RuntimeError):
    """The job ended with an error event (code is one of the protocol's error codes)."""

    def __init__(self, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id


def build_job(prompt: str | None, *, messages: Sequence[Mapping[str, Any] | Message] | None,
              prompt_token_ids: Sequence[int] | None, job_id: str | None, priority: int,
              deadline_ms: int | None, result_ttl_s: int | None, params: dict[str, Any]) -> Job:
    """Validate submit() arguments into a Job (with a fresh uuid4 hex id when none is given).
    Raises JobError (a ValueError) naming the bad field."""
    if isinstance(params.get("stop"), str):  # the engine's convenience, kept for Python callers
        params["stop"] = [params["stop"]]
    for name in ("stop", "stop_token_ids"):  # strict lists on the wire; tuples are fine in Python
        if isinstance(params.get(name), tuple):
            params[name] = list(params[name])
    fields: dict[str, Any] = {"id": job_id if job_id is not None else uuid.uuid4().hex,
                              "priority": priority, "params": params}
    optional = {"prompt": prompt, "deadline_ms": deadline_ms, "result_ttl_s": result_ttl_s,
                "messages": None if messages is None else [
                    m if isinstance(m, Message) else dict(m) for m in messages],
                "prompt_token_ids": None if prompt_token_ids is None else list(prompt_token_ids)}
    fields.update({k: v for k, v in optional.items() if v is not None})
    try:
        return Job.model_validate(fields)
    except ValidationError as exc:
        raise JobError("invalid_request", validation_message(exc), job_id) from None


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def with_id(job: Job) -> Job:
    """The job itself, or a copy with a fresh uuid4 hex id when it has none."""
    return job if job.id is not None else job.model_copy(update={"id": uuid.uuid4().hex})


def stream_entries(reply: Any) -> Iterator[tuple[str, Mapping[Any, Any]]]:
    """(entry id, fields) of an XREAD reply, in order (RESP2 lists or RESP3 dicts)."""
    for item in (reply.items() if isinstance(reply, dict) else reply or ()):
        _stream, entries = item
        for entry_id, fields in entries:
            yield as_str(entry_id), fields


def event_from_fields(fields: Mapping[Any, Any]) -> EventT:
    """The event of one result-stream entry, whether the connection decodes responses or not."""
    raw = fields.get(EVENT_FIELD, fields.get(EVENT_FIELD.encode()))
    if raw is None:
        raise ValueError(f"result-stream entry has no {EVENT_FIELD!r} field: {dict(fields)!r}")
    return parse_event(raw)


def completion_from_event(job_id: str, event: EventT) -> Completion:
    if isinstance(event, ErrorEvent):
        raise JobFailed(event.code, event.message, job_id)
    assert isinstance(event, DoneEvent), "only a final event ends a stream"
    return Completion.from_done(event)


class _Deadline:
    """Remaining time of an optional overall timeout, and the BLOCK of the next XREAD."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def block_ms(self, job_id: str) -> int:
        left = self.remaining()
        if left is None:
            return BLOCK_MS
        if left <= 0:
            raise TimeoutError(f"no final event for job {job_id} within {self.timeout} s")
        return max(1, min(BLOCK_MS, int(left * 1000)))


class Client:
    """Synchronous producer client. `Client(redis_url)` owns its connection; `Client(redis=r)` borrows r."""

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, prefix: str = "tokenrelay", *,
                 redis: redis.Redis | None = None, reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
                 **redis_kwargs: Any) -> None:
        self.keys = Keys(prefix)
        self.reconnect_timeout_s = reconnect_timeout_s
        self._owns_redis = redis is None
        if redis is None:
            redis_kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT_S)
            redis_kwargs.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT_S)
            redis = _redis_from_url(redis_url, **redis_kwargs)
        self.redis = redis

    def submit(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any] | Message] | None = None,
               prompt_token_ids: Sequence[int] | None = None, job_id: str | None = None, priority: int = 0,
               deadline_ms: int | None = None, result_ttl_s: int | None = None, **params: Any) -> str:
        """Validate and enqueue one job; returns its id. Extra keyword arguments are sampling params."""
        job = build_job(prompt, messages=messages, prompt_token_ids=prompt_token_ids, job_id=job_id,
                        priority=priority, deadline_ms=deadline_ms, result_ttl_s=result_ttl_s, params=params)
        return self.submit_job(job)

    def submit_job(self, job: Job) -> str:
        """Enqueue an already built Job (an id is made if it has none); returns its id."""
        job = with_id(job)
        assert job.id is not None
        self.redis.xadd(self.keys.jobs, {JOB_FIELD: job.to_json()})
        return job.id

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[EventT]:
        """Yield the job's events in order, ending after its done/error event. Survives dropped
        connections and Redis restarts by resuming after the last entry seen. `timeout` (s): overall
        limit for the final event, TimeoutError past it."""
        key, last_id, deadline = self.keys.result(job_id), "0-0", _Deadline(timeout)
        down_since: float | None = None
        while True:
            block_ms = deadline.block_ms(job_id)
            try:
                reply: Any = self.redis.xread({key: last_id}, count=READ_COUNT, block=block_ms)
            except _RETRYABLE as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("job=%s redis connection lost (%s); reconnecting", job_id, exc)
                self._wait_reconnect(exc, down_since, deadline)
                continue
            down_since = None
            for entry_id, fields in stream_entries(reply):
                last_id = entry_id
                event = event_from_fields(fields)
                yield event
                if event.is_final:
                    return

    def poll(self, job_id: str, after: str = "0-0") -> tuple[list[EventT], str]:
        """Events after cursor `after` (exclusive) without blocking, and the cursor to pass next."""
        entries: Any = self.redis.xrange(self.keys.result(job_id), min=f"({after}", max="+")
        events = [event_from_fields(fields) for _id, fields in entries]
        return events, as_str(entries[-1][0]) if entries else after

    def result(self, job_id: str, timeout: float | None = None) -> Completion:
        """Wait for the job's final event: the Completion, or JobFailed on an error event."""
        for event in self.stream(job_id, timeout=timeout):
            if event.is_final:
                return completion_from_event(job_id, event)
        raise AssertionError("stream() ended without a final event")

    def cancel(self, job_id: str, ttl_s: int = CANCEL_TTL_S) -> None:
        """Ask the worker to stop the job; it ends with finish_reason "cancelled" if still running."""
        self.redis.set(self.keys.cancel(job_id), "1", ex=ttl_s)

    def close(self) -> None:
        if self._owns_redis:
            self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wait_reconnect(self, exc: Exception, down_since: float, deadline: _Deadline) -> None:
        waited = time.monotonic() - down_since
        left = deadline.remaining()
        if left is None and waited > self.reconnect_timeout_s:
            raise redis.ConnectionError(
                f"Redis unreachable for {waited:.0f} s (reconnect_timeout_s={self.reconnect_timeout_s}): {exc}")
        # redis-py reconnects on the next command; sleep so a down server is not hammered.
        time.sleep(min(reconnect_delay_s(waited), 1.0 if left is None else max(0.0, left)))


def reconnect_delay_s(waited_s: float) -> float:
    return min(1.0, 0.05 + waited_s / 4)


def _redis_from_url(url: str, **kwargs: Any) -> redis.Redis:
    return redis.Redis.from_url(url, **kwargs)
