"""Client: the synchronous producer API (redis-py): submit jobs, stream / poll / wait for results, ask a
job's status, cancel.

Also the pieces AsyncClient shares: job building, entry decoding, the waits' deadline and loss watch,
JobFailed / JobLost, Submitted."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, cast

import redis
from pydantic import ValidationError

from api_client.connection import RETRYABLE_ERRORS, SyncRedis, cluster_from_env, connect
from api_client.keys import DEFAULT_LANE, EVENT_FIELD, LANES, Keys, submit_keys
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
from api_client.status import (
    STATUS_SCRIPT,
    SUBMIT_SCRIPT,
    JobStatus,
    marker_ttl_s,
    status_args,
    status_from_reply,
)

logger = logging.getLogger(__name__)

EventT = TokenEvent | DoneEvent | ErrorEvent
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
BLOCK_MS = 1000  # XREAD BLOCK per call: well under socket_timeout so a healthy wait never times out
READ_COUNT = 256  # entries per XREAD / XRANGE call
DEFAULT_SOCKET_TIMEOUT_S = 10.0
CANCEL_TTL_S = 3600  # a cancel key outlives any job that could still read it
RECONNECT_TIMEOUT_S = 30.0  # give up when Redis stays unreachable this long (without a stream timeout)
UNKNOWN_TIMEOUT_S = 60.0  # a wait on a job that stays unknown this long (never seen) raises JobLost
STATUS_CHECK_S = 5.0  # while no event arrives, a wait asks the job's status this often
_RETRYABLE = RETRYABLE_ERRORS
SHARDS_ENV = "TOKENRELAY_QUEUE_SHARDS"


class JobFailed(RuntimeError):
    """The job ended with an error event (code is one of the protocol's error codes)."""

    def __init__(self, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id


class JobLost(JobFailed):
    """A wait ended because the job does not exist: it vanished (its queue entry, pending entry and
    result stream are all gone: Redis lost them, e.g. a restart without persistence), or it stayed
    unknown for `unknown_timeout_s` (never submitted, or its result expired). Code "lost" is the
    client's own; no worker writes it."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__("lost", message, job_id)


class Submitted(str):
    """The job id `submit` returns. `replayed` is True when the id already named a job (queued, running,
    or with a result) and nothing was queued: reading the id gives that earlier job's events."""

    replayed: bool
    entry_id: str | None  # the job's {p}:jobs entry, when known

    def __new__(cls, job_id: str, *, replayed: bool = False, entry_id: str | None = None) -> Submitted:
        obj = super().__new__(cls, job_id)
        obj.replayed = replayed
        obj.entry_id = entry_id
        return obj


def submitted(job_id: str, reply: Any) -> Submitted:
    """Submitted from SUBMIT_SCRIPT's reply {1 | 0, entry id}."""
    replayed = int(reply[0]) != 1
    entry_id = None if reply[1] is None else as_str(reply[1])
    if replayed:
        logger.info("job=%s already submitted (entry %s): replaying it, nothing queued", job_id, entry_id)
    return Submitted(job_id, replayed=replayed, entry_id=entry_id)


def build_job(prompt: str | None, *, messages: Sequence[Mapping[str, Any] | Message] | None,
              prompt_token_ids: Sequence[int] | None, job_id: str | None, priority: int,
              deadline_ms: int | None, result_ttl_s: int | None, params: dict[str, Any],
              lane: str | None = None) -> Job:
    """Validate submit() arguments into a Job (with a fresh uuid4 hex id when none is given).
    Raises JobError (a ValueError) naming the bad field."""
    if isinstance(params.get("stop"), str):  # the engine's convenience, kept for Python callers
        params["stop"] = [params["stop"]]
    for name in ("stop", "stop_token_ids"):  # strict lists on the wire; tuples are fine in Python
        if isinstance(params.get(name), tuple):
            params[name] = list(params[name])
    fields: dict[str, Any] = {"id": job_id if job_id is not None else uuid.uuid4().hex,
                              "priority": priority, "params": params}
    optional = {"prompt": prompt, "deadline_ms": deadline_ms, "result_ttl_s": result_ttl_s, "lane": lane,
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


class _LossWatch:
    """Ends a wait on a job that is not there. While no event arrives, the wait asks the job's status
    every STATUS_CHECK_S; a job once seen (events, or queued / running) that turns unknown is lost at
    once, one never seen raises after unknown_timeout_s (a job may still be on its way: a Celery task
    waiting in its broker reaches {p}:jobs only when the door runs it)."""

    def __init__(self, job_id: str, unknown_timeout_s: float | None) -> None:
        self.job_id = job_id
        self.unknown_timeout_s = unknown_timeout_s
        self.interval_s = STATUS_CHECK_S if unknown_timeout_s is None else min(STATUS_CHECK_S, unknown_timeout_s / 2)
        self.next_check_s = time.monotonic()
        self.seen_as: str | None = None
        self.unknown_since: float | None = None

    def saw_events(self) -> None:
        self.seen_as = self.seen_as or "running"
        self.next_check_s = time.monotonic() + self.interval_s

    @property
    def is_due(self) -> bool:
        return time.monotonic() >= self.next_check_s

    def observe(self, status: JobStatus) -> None:
        now = time.monotonic()
        self.next_check_s = now + self.interval_s
        if status.state != "unknown":
            self.seen_as, self.unknown_since = status.state, None
            return
        if self.seen_as is not None:
            raise JobLost(f"job {self.job_id} was {self.seen_as} and is gone: no queue entry, no pending entry, "
                          "no result (Redis lost it, e.g. a restart without persistence); submit it again",
                          self.job_id)
        self.unknown_since = self.unknown_since or now
        if self.unknown_timeout_s is not None and now - self.unknown_since >= self.unknown_timeout_s:
            raise JobLost(f"no job {self.job_id}: not queued, not running and no result for "
                          f"{self.unknown_timeout_s:g} s (never submitted, its result expired, or Redis lost it)",
                          self.job_id)


def make_keys(prefix: str, num_shards: int | None, cluster: bool | None) -> Keys:
    """Keys for a client: arguments left None come from TOKENRELAY_QUEUE_SHARDS / TOKENRELAY_REDIS_CLUSTER,
    as the worker reads them (producers and workers must agree on the layout)."""
    if num_shards is None:
        raw = os.environ.get(SHARDS_ENV, "1").strip() or "1"
        if not raw.isdigit():
            raise ValueError(f"{SHARDS_ENV} must be a positive integer, got {raw!r}")
        num_shards = int(raw)
    return Keys(prefix, num_shards=num_shards, cluster=cluster_from_env() if cluster is None else cluster)


class Client:
    """Synchronous producer client. `Client(redis_url)` owns its connection; `Client(redis=r)` borrows r.
    `cluster=True`: redis-py's RedisCluster from any node's URL; `num_shards`: the workers'
    TOKENRELAY_QUEUE_SHARDS (both default to those environment variables)."""

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, prefix: str = "tokenrelay", *,
                 redis: SyncRedis | None = None, reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
                 unknown_timeout_s: float | None = UNKNOWN_TIMEOUT_S, cluster: bool | None = None,
                 num_shards: int | None = None, keys: Keys | None = None, **redis_kwargs: Any) -> None:
        self.keys = keys if keys is not None else make_keys(prefix, num_shards, cluster)
        self.reconnect_timeout_s = reconnect_timeout_s
        self.unknown_timeout_s = unknown_timeout_s
        self._owns_redis = redis is None
        if redis is None:
            redis_kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT_S)
            redis_kwargs.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT_S)
            redis = connect(redis_url, cluster=self.keys.cluster, **redis_kwargs)
        self.redis = redis
        self._submit_script = redis.register_script(SUBMIT_SCRIPT)
        self._status_script = redis.register_script(STATUS_SCRIPT)
        self._batches: Any = None  # api_client.batches.BatchStore, made on first use

    def submit(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any] | Message] | None = None,
               prompt_token_ids: Sequence[int] | None = None, job_id: str | None = None, priority: int = 0,
               deadline_ms: int | None = None, result_ttl_s: int | None = None, lane: str | None = None,
               **params: Any) -> Submitted:
        """Validate and enqueue one job; returns its id. Extra keyword arguments are sampling params.
        `lane` ("interactive", the default, or "batch") picks the priority class; `priority` orders
        jobs within it. An id that already names a job is not queued again (`.replayed` on the id)."""
        job = build_job(prompt, messages=messages, prompt_token_ids=prompt_token_ids, job_id=job_id,
                        priority=priority, deadline_ms=deadline_ms, result_ttl_s=result_ttl_s, params=params,
                        lane=lane)
        return self.submit_job(job)

    def submit_job(self, job: Job) -> Submitted:
        """Enqueue an already built Job (an id is made if it has none) with its marker; returns its id."""
        job = with_id(job)
        assert job.id is not None
        reply = self._submit_script(keys=submit_keys(self.keys, job.id, job.lane or DEFAULT_LANE),
                                    args=[job.to_json(), marker_ttl_s(job.result_ttl_s)])
        return submitted(job.id, reply)

    # ---- the OpenAI Batch API without HTTP (api_client/batches.py) -------------------------------
    def submit_batch(self, requests: str | os.PathLike[str] | Iterable[str | bytes | dict[str, Any]], *,
                     endpoint: str = "/v1/chat/completions", completion_window: str = "24h",
                     metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Queue a batch as POST /v1/files + POST /v1/batches would: `requests` is a JSONL file's path or
        its lines ({custom_id, method, url, body} objects or JSON strings). Returns the batch object;
        `wait_batch` collects it (so does any gateway on the same Redis and prefix)."""
        from api_client.batches import read_jsonl

        if isinstance(requests, (str, os.PathLike)):
            with open(requests, "rb") as f:
                content, filename = f.read(), os.path.basename(requests)
        else:
            content, filename = read_jsonl(requests), "input.jsonl"
        store = self._batch_store()
        input_file = store.create_file(content, str(filename), "batch")
        return store.create_batch(input_file["id"], endpoint, completion_window, metadata)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch object (status, request_counts, output_file_id, error_file_id, ...)."""
        return self._batch_store().batch(batch_id)

    def wait_batch(self, batch_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Collect the batch's results here until it is final (a gateway collecting it meanwhile is fine:
        a lock lets one collector work at a time); TimeoutError after `timeout` seconds."""
        return self._batch_store().wait(batch_id, f"client-{uuid.uuid4().hex}", timeout)

    def file_content(self, file_id: str) -> bytes:
        """A batch's input, output or error file."""
        return self._batch_store().file_content(file_id)

    def _batch_store(self) -> Any:
        from api_client.batches import BatchStore  # the request models it uses import this module

        if self._batches is None:
            self._batches = BatchStore(cast("redis.Redis", self.redis), self.keys)  # refuses the tagged layout
        return self._batches

    def status(self, job_id: str) -> JobStatus:
        """Where the job is now: unknown, queued, running, done or error (api_client/status.py); each
        lane's stream is asked in turn (a job is in one), the first answer that knows the job wins."""
        status = None
        for lane in LANES:
            keys, args = status_args(self.keys, job_id, lane)
            status = status_from_reply(job_id, self._status_script(keys=keys, args=args))
            if status.state != "unknown":
                break
        assert status is not None
        return status

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[EventT]:
        """Yield the job's events in order, ending after its done/error event. Survives dropped
        connections and Redis restarts by resuming after the last entry seen. `timeout` (s): overall
        limit for the final event, TimeoutError past it. JobLost when the job is not there (see
        `unknown_timeout_s`): without a timeout, the wait lasts as long as the job is queued or running."""
        key, last_id, deadline = self.keys.result(job_id), "0-0", _Deadline(timeout)
        down_since: float | None = None
        watch = _LossWatch(job_id, self.unknown_timeout_s)
        while True:
            block_ms = deadline.block_ms(job_id)
            try:
                reply: Any = self.redis.xread({key: last_id}, count=READ_COUNT, block=block_ms)
                entries = list(stream_entries(reply))
                if not entries and watch.is_due:
                    watch.observe(self.status(job_id))
            except _RETRYABLE as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("job=%s redis connection lost (%s); reconnecting", job_id, exc)
                self._wait_reconnect(exc, down_since, deadline)
                continue
            down_since = None
            if entries:
                watch.saw_events()
            for entry_id, fields in entries:
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

    def _wait_reconnect(self, exc: BaseException, down_since: float, deadline: _Deadline) -> None:
        waited = time.monotonic() - down_since
        left = deadline.remaining()
        if left is None and waited > self.reconnect_timeout_s:
            raise redis.ConnectionError(
                f"Redis unreachable for {waited:.0f} s (reconnect_timeout_s={self.reconnect_timeout_s}): {exc}")
        # redis-py reconnects on the next command; sleep so a down server is not hammered.
        time.sleep(min(reconnect_delay_s(waited), 1.0 if left is None else max(0.0, left)))


def reconnect_delay_s(waited_s: float) -> float:
    return min(1.0, 0.05 + waited_s / 4)

