"""The Lua scripts that make the worker's writes atomic, and typed async wrappers around them.

Each write first checks that this consumer still owns the job's pending entry and reads the result
stream's last event, so a zombie worker can neither duplicate tokens nor write a second final event."""

from __future__ import annotations

from typing import Any

from redis.commands.core import AsyncScript

from api_client.connection import is_cluster_pipeline
from api_client.keys import (
    CODE_FIELD,
    DEFAULT_LANE,
    EVENT_FIELD,
    JOB_FIELD,
    JOB_ID_FIELD,
    REASON_FIELD,
    Keys,
    ShardKeys,
)
from api_client.status import marker_ttl_s

# Extra field of a {p}:jobs entry written by a hand-back: earlier deliveries that ended badly.
REDELIVERIES_FIELD = "redeliveries"

# {p}:dead keeps about this many newest dead letters (XADD MAXLEN ~): a flood of bad jobs cannot grow
# it without bound.
DEAD_MAXLEN = 10_000

# Return codes shared by the scripts (also the Python side's vocabulary).
WRITTEN = 1
ALREADY = 0  # token delta already published / final event already present (the job is then acked)
FINAL_EXISTS = -1
NOT_OWNER = -2
GAP = -3  # the delta starts after the stream's next index: tokens would be missing
OVERLAP = -4  # the delta straddles the stream's next index: part of it would be duplicated
ERROR = -5  # the script raised for this job (e.g. its stream's last event is not JSON); others went on

_HELPERS = f"""
local function owned(jobs, group, entry_id, consumer)
  local pel = redis.pcall('XPENDING', jobs, group, entry_id, entry_id, 1)
  if type(pel) ~= 'table' or pel.err or #pel == 0 then return false end
  return pel[1][2] == consumer
end
local function last_event(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last == 0 then return nil end
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == '{EVENT_FIELD}' then return cjson.decode(fields[i + 1]) end
  end
  return nil
end
"""

# One token delta: written only by the job's owner, only at the stream's next index. Returns code, next_index.
_TOKENS_FN = _HELPERS + f"""
local function publish_delta(result, jobs, group, entry_id, consumer, index, num_tokens, event_json, ttl_s)
  if not owned(jobs, group, entry_id, consumer) then return {NOT_OWNER}, -1 end
  local next_index = 0
  local ev = last_event(result)
  if ev then
    if ev['type'] ~= 'token' then return {FINAL_EXISTS}, -1 end
    next_index = ev['index'] + #ev['token_ids']
  end
  if index + num_tokens <= next_index then return {ALREADY}, next_index end
  if index < next_index then return {OVERLAP}, next_index end
  if index > next_index then return {GAP}, next_index end
  redis.call('XADD', result, '*', '{EVENT_FIELD}', event_json)
  redis.call('EXPIRE', result, ttl_s)
  return {WRITTEN}, index + num_tokens
end
"""

# KEYS: jobs, result_1 .. result_n. ARGV: group, consumer, then per job: entry_id, index, num_tokens,
# event_json, ttl_s. The deltas of a whole publisher batch in one call: one command to pack, send and
# parse instead of one per job. Returns code_1, next_1, code_2, next_2, ...; a job whose delta raised
# (e.g. its stream's last event is not JSON) gets ERROR, and the others are still written.
_PUBLISH_TOKENS_MANY = _TOKENS_FN + f"""
local out = {{}}
for j = 2, #KEYS do
  local a = 3 + (j - 2) * 5
  local ok, code, next_index = pcall(publish_delta, KEYS[j], KEYS[1], ARGV[1], ARGV[a], ARGV[2],
                                     tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4])
  if ok then
    out[#out + 1] = code
    out[#out + 1] = next_index
  else
    out[#out + 1] = {ERROR}
    out[#out + 1] = -1
  end
end
return out
"""

# KEYS: result, jobs, dead. ARGV: group, entry_id, consumer, event_json, ttl_s, num_tokens,
# [raw_job, job_id, code, reason]. num_tokens >= 0 (a done event): the published tokens must number
# exactly that many. The dead letter is written only with a new final event. Acks the entry.
_PUBLISH_FINAL = _HELPERS + f"""
if not owned(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return {NOT_OWNER} end
local ev = last_event(KEYS[1])
if ev and ev['type'] ~= 'token' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return {ALREADY}
end
local num_tokens = tonumber(ARGV[6])
if num_tokens >= 0 then
  local next_index = 0
  if ev then next_index = ev['index'] + #ev['token_ids'] end
  if next_index ~= num_tokens then return {GAP} end
end
redis.call('XADD', KEYS[1], '*', '{EVENT_FIELD}', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if #ARGV >= 10 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', {DEAD_MAXLEN}, '*', '{JOB_FIELD}', ARGV[7], '{JOB_ID_FIELD}', ARGV[8],
             '{CODE_FIELD}', ARGV[9], '{REASON_FIELD}', ARGV[10])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return {WRITTEN}
"""

# KEYS: jobs, dead. ARGV: group, entry_id, consumer, raw_job, job_id, code, reason.
# For a job whose id cannot be read: no result stream to write to, only the dead letter and the ack.
_DEAD_LETTER = _HELPERS + f"""
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return {NOT_OWNER} end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', {DEAD_MAXLEN}, '*', '{JOB_FIELD}', ARGV[4], '{JOB_ID_FIELD}', ARGV[5],
           '{CODE_FIELD}', ARGV[6], '{REASON_FIELD}', ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return {WRITTEN}
"""

# KEYS: jobs[, marker]. ARGV: group, entry_id, consumer, raw_job, job_id, redeliveries[, marker_ttl_s].
# Hand a job back (shutdown): a new entry at the end of the queue and the ack of the old one, at once,
# so any worker's XREADGROUP takes it immediately. The job id travels along (the payload may lack one),
# and the job marker {p}:job:{id} (api_client/status.py) follows the job to its new entry.
_HAND_BACK = _HELPERS + f"""
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return {NOT_OWNER} end
local entry_id = redis.call('XADD', KEYS[1], '*', '{JOB_FIELD}', ARGV[4], '{JOB_ID_FIELD}', ARGV[5],
                            '{REDELIVERIES_FIELD}', ARGV[6])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if KEYS[2] then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('SET', KEYS[2], entry_id, 'KEEPTTL')
  else redis.call('SET', KEYS[2], entry_id, 'EX', ARGV[7]) end
end
return {WRITTEN}
"""

# KEYS: jobs. ARGV: group, consumer, entry_id... Renews the lease (resets the idle time without
# bumping the delivery count) of the entries this consumer still owns; returns the ones it lost.
_RENEW = _HELPERS + """
local lost = {}
for i = 3, #ARGV do
  if owned(KEYS[1], ARGV[1], ARGV[i], ARGV[2]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""


class Scripts:
    """The scripts registered on one client. The *_args helpers return (keys, args) so that a call
    can be queued on a pipeline: `await scripts.publish_final(keys=k, args=a, client=pipe)`. Every
    call's keys are those of one shard (`ShardKeys`): one hash tag, so one Redis Cluster slot; `lane`
    picks that shard's lane stream (ShardKeys.lane_jobs), the same slot."""

    def __init__(self, redis: Any, keys: Keys, consumer: str) -> None:
        self.keys = keys
        self.group = keys.group
        self.consumer = consumer
        self.publish_tokens_many: AsyncScript = redis.register_script(_PUBLISH_TOKENS_MANY)
        self.publish_final: AsyncScript = redis.register_script(_PUBLISH_FINAL)
        self.dead_letter: AsyncScript = redis.register_script(_DEAD_LETTER)
        self.hand_back: AsyncScript = redis.register_script(_HAND_BACK)
        self.renew: AsyncScript = redis.register_script(_RENEW)
        self._all = (self.publish_tokens_many, self.publish_final, self.dead_letter, self.hand_back, self.renew)

    async def load(self, redis: Any) -> None:
        """SCRIPT LOAD every script (on every master of a cluster): a pipeline's EVALSHA answers NOSCRIPT
        on a server that lost its script cache (a restart, a replica promoted by a failover)."""
        for script in self._all:
            script.sha = await redis.script_load(script.script)

    async def queue(self, pipe: Any, script: AsyncScript, keys: list[str], args: list[Any]) -> None:
        """Queue one script call on a pipeline. A cluster pipeline refuses its `evalsha` method (redis-py
        cannot load scripts on its nodes), so the command goes in as it is: its keys name its slot, and
        a node without the script answers NOSCRIPT (Publisher loads them and sends again)."""
        if is_cluster_pipeline(pipe):
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        else:
            await script(keys=keys, args=args, client=pipe)

    def tokens_many_args(self, shard: ShardKeys, deltas: list[tuple[str, str, int, int, str, int]],
                         lane: str = DEFAULT_LANE) -> tuple[list[str], list[Any]]:
        """deltas: (job_id, entry_id, index, num_tokens, event_json, ttl_s) per job, all of `shard`'s
        `lane` stream."""
        keys: list[str] = [shard.lane_jobs(lane)]
        args: list[Any] = [self.group, self.consumer]
        for job_id, entry_id, index, num_tokens, event_json, ttl_s in deltas:
            keys.append(shard.result(job_id))
            args.extend((entry_id, index, num_tokens, event_json, ttl_s))
        return keys, args

    def final_args(self, shard: ShardKeys, job_id: str, entry_id: str, event_json: str, ttl_s: int,
                   num_tokens: int = -1, dead: tuple[bytes, str, str, str] | None = None,
                   lane: str = DEFAULT_LANE) -> tuple[list[str], list[Any]]:
        args: list[Any] = [self.group, entry_id, self.consumer, event_json, ttl_s, num_tokens]
        if dead is not None:
            args.extend(dead)
        return [shard.result(job_id), shard.lane_jobs(lane), shard.dead], args

    def dead_letter_args(self, shard: ShardKeys, entry_id: str, raw: bytes, job_id: str, code: str,
                         reason: str, lane: str = DEFAULT_LANE) -> tuple[list[str], list[Any]]:
        return ([shard.lane_jobs(lane), shard.dead],
                [self.group, entry_id, self.consumer, raw, job_id, code, reason])

    def hand_back_args(self, shard: ShardKeys, entry_id: str, raw: bytes, job_id: str,
                       redeliveries: int, lane: str = DEFAULT_LANE) -> tuple[list[str], list[Any]]:
        """Re-queue at the tail of the same shard's stream of its own lane, moving the job's marker."""
        args: list[Any] = [self.group, entry_id, self.consumer, raw, job_id, redeliveries, marker_ttl_s(None)]
        return [shard.lane_jobs(lane), shard.job(job_id)], args

    async def renew_leases(self, shard: ShardKeys, entry_ids: list[str], lane: str = DEFAULT_LANE) -> list[str]:
        """Renew this consumer's entries of one (shard, lane) stream; returns the ids it no longer owns."""
        if not entry_ids:
            return []
        lost = await self.renew(keys=[shard.lane_jobs(lane)], args=[self.group, self.consumer, *entry_ids])
        return [x.decode() if isinstance(x, bytes) else str(x) for x in lost]
