"""Every Redis key name and stream field name of wire protocol v1 / v1.1, in one place.

Producers, the worker, the gateway and the tests build keys only through `Keys`, so a prefix, a shard
count or cluster mode is one argument. Layouts (docs/protocol.md, "Key layout"):

- v1 (one shard, no cluster): `{p}:jobs`, `{p}:result:{id}`, ... exactly as before.
- v1.1 (cluster mode, or more than one shard): every key of shard s carries the hash tag `{p:s}` (its
  job stream, dead letters and the per-job keys of the jobs queued there), and the worker-wide keys
  carry `{p}`, so that every Lua script and multi-key command touches one Redis Cluster slot. A job's
  shard is `crc32(job id as UTF-8) mod num_shards` (zlib's CRC-32), so any reader finds its keys from
  the id alone."""

from __future__ import annotations

import functools
import zlib
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
MAX_SHARDS = 1024  # far more than any cluster has masters; keeps a worker's per-shard reads bounded


def shard_of(job_id: str, num_shards: int) -> int:
    """The shard of a job: CRC-32 (zlib, IEEE 802.3: Python's zlib.crc32, Go's crc32.ChecksumIEEE,
    Java's java.util.zip.CRC32) of the id's UTF-8 bytes, modulo the shard count."""
    return zlib.crc32(job_id.encode()) % num_shards if num_shards > 1 else 0

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
class ShardKeys:
    """The keys of one shard: its job stream, its dead letters and the per-job keys of its jobs, all
    under one hash tag (`base`) in the v1.1 layout."""

    base: str  # "{p}" in the v1 layout, "{{p}:{index}}" in v1.1
    index: int

    @property
    def jobs(self) -> str:
        """Stream of jobs, field `job`."""
        return f"{self.base}:jobs"

    def lane_jobs(self, lane: str = DEFAULT_LANE) -> str:
        """The job stream of one lane on this shard: `jobs` for the default lane, `{jobs}:{lane}` for
        the others (same hash tag, so a lane's stream shares its shard's slot)."""
        lane_rank(lane)
        return self.jobs if lane == DEFAULT_LANE else f"{self.jobs}:{lane}"

    @property
    def lane_streams(self) -> dict[str, str]:
        """Lane -> this shard's job stream, highest lane first."""
        return {lane: self.lane_jobs(lane) for lane in LANES}

    @property
    def dead(self) -> str:
        """Stream of jobs that could not be served: fields job, job_id, code, reason."""
        return f"{self.base}:dead"

    def result(self, job_id: str) -> str:
        """Stream of events for one job, field `event`; expires result_ttl_s after its last event."""
        return f"{self.base}:result:{job_id}"

    def cancel(self, job_id: str) -> str:
        """String key a client sets (with a TTL) to cancel a job; the worker checks it."""
        return f"{self.base}:cancel:{job_id}"

    def job(self, job_id: str) -> str:
        """The job marker (api_client/status.py): the job's entry id in `jobs`."""
        return f"{self.base}:job:{job_id}"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix, shard count and layout. Cheap to build; holds no connection."""

    prefix: str = DEFAULT_PREFIX
    num_shards: int = 1
    cluster: bool = False  # Redis Cluster: the hash-tagged v1.1 layout even with one shard

    def __post_init__(self) -> None:
        bad = "*?[]{}" if self.is_tagged else "*?[]"
        if not self.prefix or any(c.isspace() or c in bad for c in self.prefix):
            raise ValueError(f"key prefix must be non-empty without whitespace or the characters {bad!r}, "
                             f"got {self.prefix!r}")
        if not 1 <= self.num_shards <= MAX_SHARDS:
            raise ValueError(f"num_shards must be in [1, {MAX_SHARDS}], got {self.num_shards}")

    @property
    def is_tagged(self) -> bool:
        """The v1.1 layout (hash tags): in cluster mode, or with more than one shard."""
        return self.cluster or self.num_shards > 1

    @functools.cached_property
    def shards(self) -> tuple[ShardKeys, ...]:
        if not self.is_tagged:
            return (ShardKeys(self.prefix, 0),)
        return tuple(ShardKeys(f"{{{self.prefix}:{i}}}", i) for i in range(self.num_shards))

    def shard_of(self, job_id: str) -> int:
        return shard_of(job_id, self.num_shards)

    def for_job(self, job_id: str) -> ShardKeys:
        """The shard a job is queued on, and whose keys hold its results, cancel flag and marker."""
        return self.shards[self.shard_of(job_id)]

    @property
    def jobs(self) -> str:
        """The job stream of a single-shard layout (with several shards: `for_job(id).jobs` or `shards`)."""
        return self._only_shard("jobs").jobs

    def lane_jobs(self, lane: str = DEFAULT_LANE) -> str:
        """The job stream of one lane in a single-shard layout (with several shards: `for_job(id)`)."""
        return self._only_shard("jobs").lane_jobs(lane)

    @property
    def lane_streams(self) -> dict[str, str]:
        """Lane -> job stream of a single-shard layout, highest lane first."""
        return self._only_shard("jobs").lane_streams

    @property
    def dead(self) -> str:
        """The dead letters of a single-shard layout (with several shards, each shard has its own)."""
        return self._only_shard("dead").dead

    @property
    def group(self) -> str:
        """Consumer group on every job stream, created at id 0 with MKSTREAM (a name, not a key)."""
        return f"{self.prefix}:workers"

    def result(self, job_id: str) -> str:
        return self.for_job(job_id).result(job_id)

    def cancel(self, job_id: str) -> str:
        return self.for_job(job_id).cancel(job_id)

    def job(self, job_id: str) -> str:
        return self.for_job(job_id).job(job_id)

    # ---- worker-wide keys: one slot of their own in the v1.1 layout ---------------------------
    @property
    def _base(self) -> str:
        return f"{{{self.prefix}}}" if self.is_tagged else self.prefix

    def heartbeat(self, consumer: str) -> str:
        """String key with a TTL that a live worker refreshes; `python -m worker --check` reads it."""
        return f"{self._base}:worker:{consumer}"

    @property
    def heartbeats(self) -> str:
        """Sorted set: each live worker's consumer name, scored by its heartbeat's expiry (epoch ms), so
        a reader (the gateway) finds the live workers without scanning the keyspace."""
        return f"{self._base}:heartbeats"

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
        """SCAN/KEYS pattern matching every worker's heartbeat key (braces are not glob characters)."""
        return f"{self._base}:worker:*"

    def consumer_from_heartbeat(self, key: str | bytes) -> str:
        """Inverse of `heartbeat`: the consumer name in a heartbeat key."""
        text = key.decode() if isinstance(key, bytes) else key
        head = f"{self._base}:worker:"
        if not text.startswith(head):
            raise ValueError(f"{text!r} is not a heartbeat key under prefix {self.prefix!r}")
        return text[len(head):]

    def _only_shard(self, what: str) -> ShardKeys:
        if self.num_shards != 1:
            raise ValueError(f"{self.num_shards} shards have a {what} stream each: use keys.shards or "
                             f"keys.for_job(job_id)")
        return self.shards[0]


def submit_keys(keys: Keys, job_id: str, lane: str = DEFAULT_LANE) -> list[str]:
    """KEYS of api_client/status.py's SUBMIT_SCRIPT for one job: result, marker, and its lane's stream on
    its shard (one slot)."""
    shard = keys.for_job(job_id)
    return [shard.result(job_id), shard.job(job_id), shard.lane_jobs(lane)]
