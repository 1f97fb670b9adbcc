"""Every Redis key name and stream field name of wire protocol v1, in one place.

Producers, the worker and the tests build keys only through `Keys`, so a prefix change is one argument."""

from __future__ import annotations

from dataclasses import dataclass

# Stream entry fields.
JOB_FIELD = "job"  # {p}:jobs entries, and {p}:dead entries (the raw job payload as received)
EVENT_FIELD = "event"  # {p}:result:{id} entries: one JSON event
# Extra fields of a {p}:dead entry (besides JOB_FIELD).
JOB_ID_FIELD = "job_id"  # the job id when it could be read, else ""
CODE_FIELD = "code"  # an error code of the protocol ("invalid_request", "internal", ...)
REASON_FIELD = "reason"  # a short human-readable reason

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "tokenrelay"

# Priority lanes (protocol v1.1), highest first: a worker fills free slots from the first lane and takes
# from the next only with room left. Each lane is its own stream; the first is {p}:jobs, so a v1
# producer (which knows no lanes) sends interactive work.
LANES = ("interactive", "batch")
DEFAULT_LANE = LANES[0]


def lane_rank(lane: str) -> int:
    """0 for the highest lane; ValueError naming the lanes for an unknown one."""
    try:
        return LANES.index(lane)
    except ValueError:
        raise ValueError(f"unknown lane {lane!r}: use one of {', '.join(LANES)}") from None


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix. Cheap to build; holds no connection."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() or c in "*?[]" for c in self.prefix):
            raise ValueError(
                f"key prefix must be non-empty without whitespace or glob characters, got {self.prefix!r}"
            )

    @property
    def jobs(self) -> str:
        """Stream of jobs, field `job`."""
        return f"{self.prefix}:jobs"

    def lane_jobs(self, lane: str = DEFAULT_LANE) -> str:
        """The job stream of one lane: {p}:jobs for the default lane, {p}:jobs:{lane} for the others."""
        lane_rank(lane)
        return self.jobs if lane == DEFAULT_LANE else f"{self.jobs}:{lane}"

    @property
    def lane_streams(self) -> dict[str, str]:
        """Lane -> job stream, highest lane first."""
        return {lane: self.lane_jobs(lane) for lane in LANES}

    @property
    def group(self) -> str:
        """Consumer group on `jobs`, created at id 0 with MKSTREAM."""
        return f"{self.prefix}:workers"

    @property
    def dead(self) -> str:
        """Stream of jobs that could not be served: fields job, job_id, code, reason."""
        return f"{self.prefix}:dead"

    def result(self, job_id: str) -> str:
        """Stream of events for one job, field `event`; expires result_ttl_s after its last event."""
        return f"{self.prefix}:result:{job_id}"

    def cancel(self, job_id: str) -> str:
        """String key a client sets (with a TTL) to cancel a job; the worker checks it."""
        return f"{self.prefix}:cancel:{job_id}"

    def job(self, job_id: str) -> str:
        """Per-job state owned by the worker (e.g. a hash: owner consumer, stream entry id, tokens
        published), so a worker taking a job over can tell what was already written."""
        return f"{self.prefix}:job:{job_id}"

    def heartbeat(self, consumer: str) -> str:
        """String key with a TTL that a live worker refreshes; `python -m worker --check` reads it."""
        return f"{self.prefix}:worker:{consumer}"

    @property
    def heartbeats(self) -> str:
        """Sorted set: each live worker's consumer name, scored by its heartbeat's expiry (epoch ms), so
        a reader (the gateway) finds the live workers without scanning the keyspace."""
        return f"{self.prefix}:heartbeats"

    # ---- the gateway's OpenAI Batch API (api_client/gateway/batches.py) --------------------------
    def file(self, file_id: str) -> str:
        """Hash: an uploaded or produced file (metadata fields and `content`), with a TTL."""
        return f"{self.prefix}:file:{file_id}"

    def batch(self, batch_id: str) -> str:
        """Hash: one batch's state (the OpenAI batch object's fields, JSON-encoded)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_lines(self, batch_id: str) -> str:
        """Hash: line number -> {custom_id, job_id} (or the line's validation error) of one batch."""
        return f"{self.prefix}:batch:{batch_id}:lines"

    def batch_results(self, batch_id: str) -> str:
        """Hash: line number -> that line's output or error file line, once its jobs are final."""
        return f"{self.prefix}:batch:{batch_id}:results"

    def batch_lock(self, batch_id: str) -> str:
        """String with a TTL: the gateway replica collecting this batch's results (its lease)."""
        return f"{self.prefix}:batch:{batch_id}:lock"

    @property
    def batches(self) -> str:
        """Sorted set: batch ids by creation time (microseconds), for GET /v1/batches."""
        return f"{self.prefix}:batches"

    @property
    def batches_open(self) -> str:
        """Set: the batches not in a final state yet, that some gateway must collect."""
        return f"{self.prefix}:batches:open"

    @property
    def heartbeat_pattern(self) -> str:
        """SCAN/KEYS pattern matching every worker's heartbeat key."""
        return f"{self.prefix}:worker:*"

    def consumer_from_heartbeat(self, key: str | bytes) -> str:
        """Inverse of `heartbeat`: the consumer name in a heartbeat key."""
        text = key.decode() if isinstance(key, bytes) else key
        head = f"{self.prefix}:worker:"
        if not text.startswith(head):
            raise ValueError(f"{text!r} is not a heartbeat key under prefix {self.prefix!r}")
        return text[len(head):]
