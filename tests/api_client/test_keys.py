"""Key layouts: v1 names unchanged by default; the v1.1 hash tags put every script's keys on one Redis
Cluster slot; a job's shard is crc32(id) mod N, the same for every reader."""

from __future__ import annotations

import zlib

import pytest
from redis.crc import key_slot

from api_client.keys import LANES, Keys, shard_of, submit_keys
from api_client.status import status_args


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_the_default_layout_is_v1_byte_for_byte() -> None:
    keys = Keys("tokenrelay")
    assert (keys.jobs, keys.dead, keys.group) == ("tokenrelay:jobs", "tokenrelay:dead", "tokenrelay:workers")
    assert (keys.result("a"), keys.cancel("a"), keys.job("a")) == (
        "tokenrelay:result:a", "tokenrelay:cancel:a", "tokenrelay:job:a")
    assert (keys.heartbeat("w"), keys.heartbeats) == ("tokenrelay:worker:w", "tokenrelay:heartbeats")
    assert keys.consumer_from_heartbeat(b"tokenrelay:worker:w") == "w"


@pytest.mark.parametrize("num_shards", [1, 4, 16])
def test_every_scripts_keys_share_one_slot(num_shards: int) -> None:
    keys = Keys("tokenrelay", num_shards=num_shards, cluster=True)
    for job_id in [f"job-{i}" for i in range(200)]:
        shard = keys.for_job(job_id)
        # submit, status, the worker's final-event script (result, jobs, dead), hand-back (jobs, marker)
        groups = [submit_keys(keys, job_id), status_args(keys, job_id)[0],
                  [shard.result(job_id), shard.jobs, shard.dead], [shard.jobs, shard.job(job_id)]]
        for group in groups:
            assert len({slot(k) for k in group}) == 1, group
    assert len({slot(keys.heartbeat(f"w{i}")) for i in range(50)} | {slot(keys.heartbeats)}) == 1
    assert keys.group == "tokenrelay:workers"  # a group name, the same on every shard


def test_shards_spread_jobs_by_crc32_of_the_id() -> None:
    keys = Keys("tokenrelay", num_shards=4)
    assert keys.result("abc") == "{tokenrelay:2}:result:abc"
    assert shard_of("abc", 4) == zlib.crc32(b"abc") % 4 == 2
    counts = [0] * 4
    for i in range(4000):
        counts[keys.shard_of(f"chatcmpl-{i:08x}")] += 1
    assert min(counts) > 900  # even within noise
    assert len({keys.shards[s].jobs for s in range(4)}) == 4
    with pytest.raises(ValueError, match="4 shards"):
        _ = keys.jobs  # ambiguous with several shards: say which


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="characters"):
        Keys("{tokenrelay}", cluster=True)  # would break the hash tags
    assert Keys("{tokenrelay}").jobs == "{tokenrelay}:jobs"  # fine in v1, as before
    with pytest.raises(ValueError, match="num_shards"):
        Keys("tokenrelay", num_shards=0)


@pytest.mark.parametrize("num_shards", [1, 4])
def test_lanes_live_on_every_shard_and_each_script_call_touches_one_slot(num_shards: int) -> None:
    from redis.asyncio import Redis

    from worker.lua import Scripts

    assert (Keys("tokenrelay").lane_jobs("interactive"), Keys("tokenrelay").lane_jobs("batch")) == (
        "tokenrelay:jobs", "tokenrelay:jobs:batch")  # the v1 layout keeps issue 15's names
    keys = Keys("tokenrelay", num_shards=num_shards, cluster=True)
    assert keys.shards[0].lane_jobs("batch") == "{tokenrelay:0}:jobs:batch"
    scripts = Scripts(Redis(), keys, "w1")  # registering needs no connection
    for job_id in [f"job-{i}" for i in range(100)]:
        shard = keys.for_job(job_id)
        for lane in LANES:
            groups = [submit_keys(keys, job_id, lane), status_args(keys, job_id, lane)[0],
                      scripts.final_args(shard, job_id, "1-0", "{}", 60, lane=lane)[0],
                      scripts.dead_letter_args(shard, "1-0", b"", job_id, "internal", "x", lane)[0],
                      scripts.hand_back_args(shard, "1-0", b"", job_id, 0, lane)[0],
                      scripts.tokens_many_args(shard, [(job_id, "1-0", 0, 1, "{}", 60)], lane)[0]]
            assert shard.lane_jobs(lane) in groups[0]
            for group in groups:
                assert len({slot(k) for k in group}) == 1, group
