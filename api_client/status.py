"""What a client can learn about one job: the job marker written at submit, and `JobStatus`, read in one
atomic script from what Redis holds (the marker, the result stream, the job's entry and its PEL record).

The marker `{p}:job:{id}` holds the `{p}:jobs` entry id of the job: written with the XADD by the
submit script (so a reused id replays the earlier job instead of queueing it twice), moved by a
worker's hand-back to the re-queued entry. Raw `XADD` callers without an id use the entry id as the job id."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from api_client.keys import DEFAULT_LANE, EVENT_FIELD, JOB_FIELD, Keys
from api_client.schema import DoneEvent, ErrorEvent, TokenEvent, parse_event

JobState = Literal["unknown", "queued", "running", "done", "error"]
DEFAULT_RESULT_TTL_S = 3600  # the worker's default result_ttl_s
MARKER_QUEUE_GRACE_S = 86_400  # a marker outlives the result TTL by this: jobs may wait this long queued
ENTRY_ID_RE = re.compile(r"^\d+-\d+$")


def marker_ttl_s(result_ttl_s: int | None) -> int:
    return (result_ttl_s or DEFAULT_RESULT_TTL_S) + MARKER_QUEUE_GRACE_S


# KEYS: result, marker, jobs. ARGV: job_json, marker_ttl_s. Returns {1, entry_id} when queued now,
# {0, entry_id or false} when the id already names a job: one that has a result stream, or whose marked
# entry is still in {p}:jobs (queued or running). A marker whose entry is gone without any result (the
# result expired, or Redis lost it) does not block the id.
SUBMIT_SCRIPT = f"""
local marked = redis.call('GET', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then return {{0, marked}} end
if marked and #redis.call('XRANGE', KEYS[3], marked, marked) > 0 then return {{0, marked}} end
local entry_id = redis.call('XADD', KEYS[3], '*', '{JOB_FIELD}', ARGV[1])
redis.call('SET', KEYS[2], entry_id, 'EX', ARGV[2])
return {{1, entry_id}}
"""

# KEYS: marker, result, jobs, cancel. ARGV: group, job_id. Read-only. Returns
# {marked entry id, last event json, result entries, candidate entry id, its job payload, pending
#  {consumer, idle_ms, deliveries}, group last-delivered-id, group lag, jobs length, cancel set}.
STATUS_SCRIPT = f"""
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return false
end
local marked = redis.call('GET', KEYS[1])
local last_event = false
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then last_event = field(last[1][2], '{EVENT_FIELD}') end
local num_results = redis.call('XLEN', KEYS[2])
local candidate = marked
if not candidate and string.match(ARGV[2], '^%d+%-%d+$') then candidate = ARGV[2] end
local payload, pending = false, false
local exists = redis.call('EXISTS', KEYS[3]) == 1
if candidate and exists then
  local entry = redis.call('XRANGE', KEYS[3], candidate, candidate)
  if #entry > 0 then payload = field(entry[1][2], '{JOB_FIELD}') or '' end
  local pel = redis.pcall('XPENDING', KEYS[3], ARGV[1], candidate, candidate, 1)
  if type(pel) == 'table' and not pel.err and #pel > 0 then
    pending = {{pel[1][2], pel[1][3], pel[1][4]}}
  end
end
local last_delivered, lag = false, false
if exists then
  local groups = redis.call('XINFO', 'GROUPS', KEYS[3])
  for _, g in ipairs(groups) do
    local name = field(g, 'name')
    if name == ARGV[1] then
      last_delivered = field(g, 'last-delivered-id')
      lag = field(g, 'lag')
    end
  end
end
local length = 0
if exists then length = redis.call('XLEN', KEYS[3]) end
return {{marked, last_event, num_results, candidate, payload, pending, last_delivered, lag, length,
        redis.call('EXISTS', KEYS[4])}}
"""


@dataclass(frozen=True)
class JobStatus:
    """Where a job is. `unknown`: never submitted here, its result expired, or Redis lost it (a restart
    without persistence); `queued`: in {p}:jobs, not yet delivered (`queue_lag` jobs wait in all);
    `running`: delivered to `consumer` or tokens published; `done` / `error`: its final event is there."""

    job_id: str
    state: JobState
    entry_id: str | None = None  # its {p}:jobs entry, when known
    queue_lag: int | None = None  # queued: jobs in {p}:jobs not yet delivered to any worker (this one included)
    consumer: str | None = None  # running: the worker holding its entry
    num_deliveries: int | None = None  # running: times its entry was delivered
    num_tokens: int = 0  # completion tokens published so far
    finish_reason: str | None = None  # done
    error_code: str | None = None  # error
    error_message: str | None = None  # error
    is_cancel_requested: bool = False

    @property
    def is_final(self) -> bool:
        return self.state in ("done", "error")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        details = {"entry": self.entry_id, "lag": self.queue_lag, "consumer": self.consumer,
                   "deliveries": self.num_deliveries, "tokens": self.num_tokens or None,
                   "finish_reason": self.finish_reason, "code": self.error_code, "message": self.error_message,
                   "cancel_requested": self.is_cancel_requested or None}
        return " ".join([self.state, *(f"{k}={v}" for k, v in details.items() if v is not None)])


def status_args(keys: Keys, job_id: str, lane: str = DEFAULT_LANE) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of STATUS_SCRIPT, looking for the job's entry in `lane`'s stream on its shard."""
    shard = keys.for_job(job_id)
    return ([shard.job(job_id), shard.result(job_id), shard.lane_jobs(lane), shard.cancel(job_id)],
            [keys.group, job_id])


def status_from_reply(job_id: str, reply: list[Any]) -> JobStatus:
    """JobStatus from STATUS_SCRIPT's reply."""
    marked, last_raw, candidate, payload, last_delivered = (
        None if reply[i] is None else _text(reply[i]) for i in (0, 1, 3, 4, 6))
    num_results, pending, lag, length, cancel = reply[2], reply[5], reply[7], reply[8], reply[9]
    base: dict[str, Any] = {"job_id": job_id, "is_cancel_requested": bool(cancel)}
    last = _event(last_raw)
    if isinstance(last, DoneEvent):
        return JobStatus(state="done", entry_id=marked, num_tokens=len(last.token_ids),
                         finish_reason=last.finish_reason, **base)
    if isinstance(last, ErrorEvent):
        return JobStatus(state="error", entry_id=marked, error_code=last.code, error_message=last.message, **base)
    num_tokens = last.index + len(last.token_ids) if isinstance(last, TokenEvent) else 0
    # A markerless candidate (the job id looks like an entry id) is this job only if its payload has no id.
    is_ours = candidate is not None and (marked is not None or _payload_id(payload) is None)
    entry_id = candidate if is_ours else None
    if is_ours and pending:
        consumer, _idle_ms, deliveries = pending
        return JobStatus(state="running", entry_id=entry_id, consumer=_text(consumer),
                         num_deliveries=int(deliveries), num_tokens=num_tokens, **base)
    if num_tokens or num_results:
        return JobStatus(state="running", entry_id=entry_id, num_tokens=num_tokens, **base)
    if is_ours and payload is not None and (last_delivered is None or _after(str(candidate), last_delivered)):
        queue_lag = int(lag) if lag is not None else (int(length) if last_delivered is None else None)
        return JobStatus(state="queued", entry_id=entry_id, queue_lag=queue_lag, **base)
    return JobStatus(state="unknown", entry_id=entry_id, **base)


def _event(raw: str | None) -> TokenEvent | DoneEvent | ErrorEvent | None:
    if raw is None:
        return None
    try:
        return parse_event(raw)
    except ValueError:
        return None


def _payload_id(payload: str | None) -> str | None:
    """The id in a job payload (None when it has none, or it is not a JSON object)."""
    if not payload:
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _after(entry_id: str, other: str) -> bool:
    return _stream_id(entry_id) > _stream_id(other)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
