"""The OpenAI Batch API's state in Redis: files, batches, each line's jobs in the `batch` lane, and the
collection of their results into an output file and an error file.

One owner for all of it (BatchStore), used by the gateway (/v1/files, /v1/batches, its collector) and by
Client.submit_batch. Everything lives in Redis, so any process can finish a batch another one started:
a collector holds the batch's lock (a lease) while it collects, and job ids are made from the batch id
and the line number, so submitting a batch's lines again queues nothing twice."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import redis
from pydantic import ValidationError

from api_client.gateway.requests import ChatCompletionRequest, CompletionRequest
from api_client.gateway.responses import Choice, ResponseBuilder
from api_client.keys import Keys
from api_client.schema import DoneEvent, ErrorEvent, Job, parse_event, validation_message
from api_client.status import SUBMIT_SCRIPT, marker_ttl_s

logger = logging.getLogger("tokenrelay.batches")

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                      "cancelling", "cancelled"]
FINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
ENDPOINTS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
COMPLETION_WINDOWS_S = {"24h": 86_400}  # OpenAI accepts only "24h"
MAX_LINES = 50_000  # OpenAI's limit on requests per batch
MAX_METADATA_PAIRS = 16
READ_CHUNK = 500  # result streams read per pipeline while collecting
# A {p}:batch:{id}:results value is one of these markers followed by the line for that file.
_OUTPUT, _ERROR = "o", "e"
_BATCH_EXPIRED = {"code": "batch_expired",
                  "message": "This request could not be executed before the completion window expired."}
_BATCH_CANCELLED = {"code": "batch_cancelled", "message": "The batch was cancelled before this request finished."}

# KEYS: lock. ARGV: owner, ttl_ms. Takes the lock when free, renews it when ours. Returns 1 when held.
_LOCK_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: batch. ARGV: allowed statuses (comma-separated), then field, value pairs. Writes the fields only
# while the status is one of those (a cancel and the collector never overwrite each other). Returns 1/0.
_TRANSITION_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == status then allowed = true end
end
if not allowed then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


# KEYS: results, batch. ARGV: line, value pairs. Records each line's result once (HSETNX) and counts it
# in the batch's `num_completed` / `num_failed` fields in the same step, so a line collected twice (a
# lock that lapsed mid-round) is counted once.
_RECORD_SCRIPT = f"""
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    if string.sub(ARGV[i + 1], 1, 1) == '{_ERROR}' then redis.call('HINCRBY', KEYS[2], 'num_failed', 1)
    else redis.call('HINCRBY', KEYS[2], 'num_completed', 1) end
  end
end
return 1
"""


class BatchApiError(ValueError):
    """A request the Batch API refuses: `status` is the HTTP status (400, 404, or 501 in the tagged layout)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def tagged_layout_refusal() -> BatchApiError:
    """The Batch API keeps one batch's lines, results and its jobs' keys together and is written for the
    v1 (untagged) layout; with Redis Cluster or several shards it is refused (docs/protocol.md, "Known
    limits"). Lanes, including the batch lane through per-job submits, work in both layouts."""
    return BatchApiError(501, "the Batch API is not available with Redis Cluster or more than one queue shard "
                              "(the v1.1 hash-tagged key layout); submit jobs one by one with lane=\"batch\"",
                         code="unsupported_layout")


@dataclass(frozen=True)
class BatchConfig:
    max_file_bytes: int = 64 << 20
    file_ttl_s: int = 7 * 86_400  # uploaded and produced files, and finished batches, expire after this
    lock_ttl_s: float = 10.0  # a collector that stops renewing its lock loses it after this
    default_max_tokens: int | None = None


@dataclass
class _Line:
    """One input line as the batch holds it: its jobs, or why it was refused."""

    custom_id: str | None
    job_ids: list[str]
    model: str = ""
    kind: str = "chat"
    error: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps({"custom_id": self.custom_id, "job_ids": self.job_ids, "model": self.model,
                           "kind": self.kind, "error": self.error})

    @classmethod
    def from_json(cls, raw: bytes | str) -> _Line:
        data = json.loads(raw)
        return cls(data["custom_id"], data["job_ids"], data.get("model", ""), data.get("kind", "chat"),
                   data.get("error"))


def _now_s() -> int:
    return int(time.time())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BatchStore:
    """Files and batches under one key prefix, over a synchronous redis-py client."""

    def __init__(self, redis_client: redis.Redis, keys: Keys, config: BatchConfig | None = None) -> None:
        if keys.is_tagged:
            raise tagged_layout_refusal()
        self.redis: Any = redis_client  # redis-py's reply types are unions of every RESP shape
        self.keys = keys
        self.config = config or BatchConfig()
        self._submit = redis_client.register_script(SUBMIT_SCRIPT)
        self._lock = redis_client.register_script(_LOCK_SCRIPT)
        self._transition = redis_client.register_script(_TRANSITION_SCRIPT)
        self._record = redis_client.register_script(_RECORD_SCRIPT)
        self._lines: dict[str, dict[int, _Line]] = {}  # batch id -> its lines (they never change once written)

    # ---- files -------------------------------------------------------------------------------
    def create_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        """Store an uploaded file (purpose "batch": JSONL, at most max_file_bytes)."""
        if purpose != "batch":
            raise BatchApiError(400, f"purpose must be 'batch' (got {purpose!r}): tokenrelay stores batch "
                                "input files only", param="purpose")
        if len(content) > self.config.max_file_bytes:
            raise BatchApiError(400, f"the file is {len(content)} bytes, over the limit of "
                                f"{self.config.max_file_bytes}", param="file")
        if not content.strip():
            raise BatchApiError(400, "the file is empty", param="file")
        return self._put_file(content, filename or "input.jsonl", purpose)

    def _put_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        created = _now_s()
        meta: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex}", "object": "file", "bytes": len(content), "created_at": created,
            "expires_at": created + self.config.file_ttl_s, "filename": filename, "purpose": purpose,
            "status": "processed", "status_details": None}
        key = self.keys.file(meta["id"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"meta": json.dumps(meta), "content": content})
        pipe.expire(key, self.config.file_ttl_s)
        pipe.execute()
        return meta

    def file(self, file_id: str) -> dict[str, Any]:
        raw = self.redis.hget(self.keys.file(file_id), "meta")
        if raw is None:
            raise BatchApiError(404, f"no file {file_id!r} (never uploaded, or expired)", param="file_id")
        meta: dict[str, Any] = json.loads(raw)
        return meta

    def file_content(self, file_id: str) -> bytes:
        content = self.redis.hget(self.keys.file(file_id), "content")
        if content is None:
            raise BatchApiError(404, f"no file {file_id!r} (never uploaded, or expired)", param="file_id")
        return bytes(content)

    # ---- batches -----------------------------------------------------------------------------
    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str = "24h",
                     metadata: dict[str, str] | None = None, api_key_id: str | None = None) -> dict[str, Any]:
        """Validate the request, record the batch ("validating") and queue its lines' jobs in the batch
        lane; a line that fails validation goes to the error file and the others run."""
        if endpoint not in ENDPOINTS:
            raise BatchApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)} (got {endpoint!r})",
                                param="endpoint")
        if completion_window not in COMPLETION_WINDOWS_S:
            raise BatchApiError(400, f"completion_window must be one of {', '.join(COMPLETION_WINDOWS_S)}",
                                param="completion_window")
        if metadata is not None and (len(metadata) > MAX_METADATA_PAIRS or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise BatchApiError(400, f"metadata: at most {MAX_METADATA_PAIRS} string pairs", param="metadata")
        if self.file(input_file_id)["purpose"] != "batch":
            raise BatchApiError(400, f"file {input_file_id!r} was not uploaded with purpose 'batch'",
                                param="input_file_id")
        created = _now_s()
        batch_id = f"batch_{uuid.uuid4().hex}"
        fields: dict[str, Any] = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
            "completion_window": completion_window, "status": "validating", "output_file_id": None,
            "error_file_id": None, "created_at": created, "in_progress_at": None,
            "expires_at": created + COMPLETION_WINDOWS_S[completion_window], "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata, "model": None,
            "api_key_id": api_key_id}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.batch(batch_id), mapping={k: json.dumps(v) if k != "status" else v
                                                      for k, v in fields.items()})
        pipe.zadd(self.keys.batches, {batch_id: time.time_ns() // 1000})  # microseconds: exact in a double
        pipe.sadd(self.keys.batches_open, batch_id)
        pipe.execute()
        self._validate_and_submit(batch_id)
        return self.batch(batch_id)

    def _validate_and_submit(self, batch_id: str) -> None:
        """validating -> in_progress (or failed): every line's jobs queued. Safe to run again after a
        crash midway: the lines and job ids come out the same, and a queued job id is not queued twice."""
        batch = self._fields(batch_id)
        try:
            content = self.file_content(batch["input_file_id"])
        except BatchApiError:
            self._finish(batch_id, "failed", errors=[{"code": "file_expired", "message": "the input file is gone",
                                                      "param": "input_file_id", "line": None}])
            return
        lines = content.splitlines()
        if len(lines) > MAX_LINES:
            self._finish(batch_id, "failed", errors=[{"code": "too_many_requests", "param": None, "line": None,
                                                      "message": f"{len(lines)} lines, over the limit of {MAX_LINES}"}])
            return
        deadline_ms = int(batch["expires_at"]) * 1000
        parsed: dict[int, _Line] = {}
        jobs: list[Job] = []
        seen: set[str] = set()
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            line, line_jobs = self._parse_line(batch_id, number, raw, batch, deadline_ms, seen)
            parsed[number] = line
            jobs.extend(line_jobs)
        models = sorted({line.model for line in parsed.values() if line.model})
        pipe = self.redis.pipeline(transaction=False)  # it loads the submit script first when Redis lacks it
        for job in jobs:
            assert job.id is not None
            self._submit(keys=[self.keys.result(job.id), self.keys.job(job.id), self.keys.lane_jobs("batch")],
                         args=[job.to_json(), marker_ttl_s(job.result_ttl_s)], client=pipe)
        if parsed:
            pipe.hset(self.keys.batch_lines(batch_id), mapping={str(n): line.to_json() for n, line in parsed.items()})
        pipe.execute()
        self._lines[batch_id] = parsed
        counts = {"total": len(parsed), "completed": 0, "failed": 0}
        self._transition(keys=[self.keys.batch(batch_id)], args=[
            "validating", "status", "in_progress", "in_progress_at", json.dumps(_now_s()),
            "request_counts", json.dumps(counts), "model", json.dumps(models[0] if models else None)])
        logger.info("batch=%s event=in_progress lines=%d jobs=%d", batch_id, len(parsed), len(jobs))

    def _parse_line(self, batch_id: str, number: int, raw: bytes, batch: dict[str, Any], deadline_ms: int,
                    seen: set[str]) -> tuple[_Line, list[Job]]:
        def refuse(message: str, custom_id: str | None = None) -> tuple[_Line, list[Job]]:
            return _Line(custom_id, [], error={"code": "invalid_request", "message": f"line {number}: {message}"}), []

        try:
            obj = json.loads(raw)
        except ValueError as exc:
            return refuse(f"not valid JSON ({exc})")
        if not isinstance(obj, dict):
            return refuse("must be a JSON object {custom_id, method, url, body}")
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return refuse("custom_id must be a non-empty string")
        if custom_id in seen:
            return refuse(f"custom_id {custom_id!r} appears twice; each line needs its own", custom_id)
        seen.add(custom_id)
        extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if extra:
            return refuse(f"unknown fields {extra}", custom_id)
        if obj.get("method") != "POST":
            return refuse("method must be POST", custom_id)
        if obj.get("url") != batch["endpoint"]:
            return refuse(f"url must be the batch's endpoint {batch['endpoint']}", custom_id)
        body = obj.get("body")
        if not isinstance(body, dict):
            return refuse("body must be a JSON object", custom_id)
        if body.get("stream"):
            return refuse("body.stream: a batch request cannot stream", custom_id)
        model_cls = ENDPOINTS[batch["endpoint"]]
        try:
            request = model_cls.model_validate(body)
            if request.num_logprobs() is not None:
                raise ValueError("logprobs are not supported in batches")
            _, jobs = request.jobs(self.config.default_max_tokens, batch.get("api_key_id"))
        except ValidationError as exc:
            return refuse(f"body.{validation_message(exc)}", custom_id)
        except ValueError as exc:
            return refuse(f"body: {exc}", custom_id)
        base = f"{batch_id}.{number}"
        ttl_s = COMPLETION_WINDOWS_S[batch["completion_window"]] + self.config.file_ttl_s
        jobs = [job.model_copy(update={"id": base if len(jobs) == 1 else f"{base}.{i}", "lane": "batch",
                                       "deadline_ms": deadline_ms, "result_ttl_s": min(ttl_s, 30 * 86_400)})
                for i, job in enumerate(jobs)]
        kind = "chat" if model_cls is ChatCompletionRequest else "completion"
        return _Line(custom_id, [job.id for job in jobs if job.id], request.model, kind), jobs

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The OpenAI batch object."""
        fields = self._fields(batch_id)
        fields.pop("api_key_id", None)
        return fields

    def _fields(self, batch_id: str) -> dict[str, Any]:
        raw = self.redis.hgetall(self.keys.batch(batch_id))
        if not raw:
            raise BatchApiError(404, f"no batch {batch_id!r} (never created, or expired)", param="batch_id")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = _text(key)
            out[name] = _text(value) if name == "status" else json.loads(value)
        counts = out["request_counts"]
        counts["completed"], counts["failed"] = out.pop("num_completed", 0), out.pop("num_failed", 0)
        return out

    def list_batches(self, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Newest first, as OpenAI lists them; `after` is the last id of the previous page."""
        if not 1 <= limit <= 100:
            raise BatchApiError(400, "limit must be between 1 and 100", param="limit")
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(self.keys.batches, after)
            if rank is None:
                raise BatchApiError(404, f"no batch {after!r} to list after", param="after")
            start = int(rank) + 1
        ids = [_text(i) for i in self.redis.zrevrange(self.keys.batches, start, start + limit)]
        data = []
        for batch_id in ids[:limit]:
            try:
                data.append(self.batch(batch_id))
            except BatchApiError:  # expired meanwhile: drop it from the index
                self.redis.zrem(self.keys.batches, batch_id)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(ids) > limit}

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """in_progress (or validating) -> cancelling: every job of the batch gets its cancel key; the
        collector ends the batch `cancelled` once each line has its final event."""
        self._fields(batch_id)
        if self._transition(keys=[self.keys.batch(batch_id)], args=[
                "validating,in_progress", "status", "cancelling", "cancelling_at", json.dumps(_now_s())]):
            pipe = self.redis.pipeline(transaction=False)
            for line in self._load_lines(batch_id).values():
                for job_id in line.job_ids:
                    pipe.set(self.keys.cancel(job_id), "1", ex=3600)
            pipe.execute()
            logger.info("batch=%s event=cancelling", batch_id)
        return self.batch(batch_id)

    def open_batches(self) -> list[str]:
        return sorted(_text(b) for b in self.redis.smembers(self.keys.batches_open))

    # ---- collection --------------------------------------------------------------------------
    def collect(self, batch_id: str, owner: str) -> bool:
        """One round of collection by `owner` (while it holds the batch's lock): final events into the
        results, and the output and error files once every line has one. Returns whether the batch is in
        a final state (False also when another collector holds the lock)."""
        if not self._lock(keys=[self.keys.batch_lock(batch_id)], args=[owner, int(self.config.lock_ttl_s * 1000)]):
            return False
        try:
            fields = self._fields(batch_id)
        except BatchApiError:  # expired, or deleted: nothing to collect
            self.redis.srem(self.keys.batches_open, batch_id)
            return True
        status = fields["status"]
        if status in FINAL_STATUSES:
            self.redis.srem(self.keys.batches_open, batch_id)
            return True
        if status == "validating":  # its creator stopped midway: finish the submission
            self._validate_and_submit(batch_id)
            return False
        lines = self._load_lines(batch_id)
        done = {int(_text(n)) for n in self.redis.hkeys(self.keys.batch_results(batch_id))}
        pending = [n for n in sorted(lines) if n not in done]
        results = {n: self._error_line(lines[n], None, lines[n].error) for n in pending if lines[n].error}
        open_lines = [n for n in pending if not lines[n].error]
        expired = _now_s() >= int(fields["expires_at"])
        for start in range(0, len(open_lines), READ_CHUNK):
            results.update(self._read_finals(lines, open_lines[start:start + READ_CHUNK], status, expired))
        if results:
            self._record(keys=[self.keys.batch_results(batch_id), self.keys.batch(batch_id)],
                         args=[x for n, v in results.items() for x in (str(n), v)])
        if len(done) + len(results) < len(lines):
            return False
        return self._finalize(batch_id, fields, lines)

    def _read_finals(self, lines: dict[int, _Line], numbers: list[int], status: str,
                     expired: bool) -> dict[int, str]:
        pipe = self.redis.pipeline(transaction=False)
        for n in numbers:
            for job_id in lines[n].job_ids:
                pipe.xrevrange(self.keys.result(job_id), count=1)
        replies = iter(pipe.execute())
        out: dict[int, str] = {}
        for n in numbers:
            line = lines[n]
            finals: list[DoneEvent | ErrorEvent] = []
            num_unstarted = 0
            for _ in line.job_ids:
                reply = next(replies)
                event = parse_event(reply[0][1][b"event"]) if reply else None
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    finals.append(event)
                num_unstarted += not reply
            if len(finals) == len(line.job_ids):
                out[n] = self._line_result(line, finals, cancelled=status == "cancelling")
            elif num_unstarted and expired:
                out[n] = self._error_line(line, None, _BATCH_EXPIRED)
            elif num_unstarted and status == "cancelling":
                # Not started: a cancelled batch does not wait for it. Its cancel key (set by cancel)
                # makes a worker that reads it later finish it without running it.
                out[n] = self._error_line(line, None, _BATCH_CANCELLED)
        return out

    def _line_result(self, line: _Line, finals: list[DoneEvent | ErrorEvent], cancelled: bool) -> str:
        errors = [f for f in finals if isinstance(f, ErrorEvent)]
        dones = [f for f in finals if isinstance(f, DoneEvent)]
        if errors:
            error = errors[0]
            if error.code == "expired":
                return self._error_line(line, None, _BATCH_EXPIRED)
            status_code = 400 if error.code in ("invalid_request", "too_long") else 500
            body = {"error": {"message": error.message, "type": "invalid_request_error" if status_code == 400
                              else "server_error", "param": None,
                              "code": "context_length_exceeded" if error.code == "too_long" else error.code}}
            return self._error_line(line, {"status_code": status_code, "request_id": line.job_ids[0], "body": body},
                                    None)
        if any(d.finish_reason == "cancelled" for d in dones):
            return self._error_line(line, None, _BATCH_CANCELLED)
        builder = ResponseBuilder("chat" if line.kind == "chat" else "completion", line.job_ids[0], line.model, None)
        choices = []
        for index, done in enumerate(dones):
            choice = Choice(index)
            choice.finish(done)
            choices.append(choice)
        body = builder.body(choices, dones[0].usage.prompt_tokens)
        return _OUTPUT + json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
                                     "response": {"status_code": 200, "request_id": line.job_ids[0], "body": body},
                                     "error": None})

    @staticmethod
    def _error_line(line: _Line, response: dict[str, Any] | None, error: dict[str, str] | None) -> str:
        return _ERROR + json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
                                    "response": response, "error": error})

    def _finalize(self, batch_id: str, fields: dict[str, Any], lines: dict[int, _Line]) -> bool:
        """Every line has its result: the output and error files, then the final status."""
        status = fields["status"]
        if not self._transition(keys=[self.keys.batch(batch_id)], args=[
                "in_progress,cancelling,finalizing", "finalizing_at", json.dumps(_now_s())]):
            return True
        if status == "in_progress":
            self._transition(keys=[self.keys.batch(batch_id)], args=["in_progress", "status", "finalizing"])
        raw = self.redis.hgetall(self.keys.batch_results(batch_id))
        outputs: list[bytes] = []
        errors: list[bytes] = []
        is_expired = False
        for n in sorted(int(_text(k)) for k in raw):
            value = _text(raw[str(n).encode()])
            row, is_error = value[1:], value.startswith(_ERROR)
            is_expired |= is_error and (json.loads(row).get("error") or {}).get("code") == "batch_expired"
            (errors if is_error else outputs).append(row.encode())
        update: dict[str, Any] = {}
        if outputs:
            update["output_file_id"] = self._put_file(b"\n".join(outputs) + b"\n", f"{batch_id}_output.jsonl",
                                                      "batch_output")["id"]
        if errors:
            update["error_file_id"] = self._put_file(b"\n".join(errors) + b"\n", f"{batch_id}_error.jsonl",
                                                     "batch_output")["id"]
        final = "cancelled" if status == "cancelling" else "expired" if is_expired else "completed"
        self._finish(batch_id, final, **update)
        logger.info("batch=%s event=%s completed=%d failed=%d", batch_id, final, len(outputs), len(errors))
        return True

    def _finish(self, batch_id: str, status: str, errors: list[dict[str, Any]] | None = None,
                **update: Any) -> None:
        at = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at",
              "failed": "failed_at"}[status]
        args: list[Any] = ["validating,in_progress,cancelling,finalizing", "status", status, at, json.dumps(_now_s())]
        if errors is not None:
            args += ["errors", json.dumps({"object": "list", "data": errors})]
        for key, value in update.items():
            args += [key, json.dumps(value)]
        self._transition(keys=[self.keys.batch(batch_id)], args=args)
        ttl = self.config.file_ttl_s
        pipe = self.redis.pipeline(transaction=False)
        for key in (self.keys.batch(batch_id), self.keys.batch_lines(batch_id), self.keys.batch_results(batch_id)):
            pipe.expire(key, ttl)
        pipe.srem(self.keys.batches_open, batch_id)
        pipe.delete(self.keys.batch_lock(batch_id))
        pipe.execute()
        self._lines.pop(batch_id, None)

    def _load_lines(self, batch_id: str) -> dict[int, _Line]:
        lines = self._lines.get(batch_id)
        if lines is None:
            raw = self.redis.hgetall(self.keys.batch_lines(batch_id))
            lines = {int(_text(k)): _Line.from_json(v) for k, v in raw.items()}
            self._lines[batch_id] = lines
        return lines

    def wait(self, batch_id: str, owner: str, timeout_s: float | None = None, poll_s: float = 0.2) -> dict[str, Any]:
        """Collect (as `owner`) until the batch is final; TimeoutError after timeout_s."""
        started = time.monotonic()
        while not self.collect(batch_id, owner):
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout_s:g} s")
            time.sleep(poll_s)  # a poll interval: the jobs run elsewhere
        return self.batch(batch_id)


def read_jsonl(lines: Iterable[str | bytes | dict[str, Any]]) -> bytes:
    """A batch input file from lines: JSON objects are dumped, strings and bytes taken as they are."""
    out = []
    for line in lines:
        if isinstance(line, dict):
            out.append(json.dumps(line).encode())
        else:
            out.append(line.encode() if isinstance(line, str) else bytes(line))
    return b"\n".join(out) + b"\n"
