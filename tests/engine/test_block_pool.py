"""BlockPool and KVCacheManager on a fake KV configuration (blocks of 4 tokens): ref counts, LRU eviction,
tail-first freeing, chained hashes, the one-token-short prefix cap and kv_waste."""

from __future__ import annotations

import pytest

from engine.block_pool import NULL_BLOCK_ID, BlockPool, hash_block_tokens
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(req_id: str, prompt: list[int]) -> Request:
    return Request(request_id=req_id, prompt_token_ids=prompt, sampling_params=SamplingParams())


def prefill(manager: KVCacheManager, request: Request) -> list[int]:
    """Admit a request (with its prefix hit) and compute its whole prompt, as the scheduler would."""
    hit_block_ids, num_hit_tokens = manager.get_computed_blocks(request)
    new_block_ids = manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hit_block_ids)
    assert new_block_ids is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request, request.num_computed_tokens)
    return manager.get_block_ids(request.request_id)


def test_ref_counts_and_counts() -> None:
    pool = BlockPool(num_blocks=10)
    assert pool.num_total_blocks == 9 and pool.num_free_blocks == 9 and pool.usage == 0.0
    block_ids = pool.allocate(9)
    assert NULL_BLOCK_ID not in block_ids and sorted(block_ids) == list(range(1, 10))
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    pool.touch(block_ids[:2])  # shared by a second request
    assert pool.ref_count(block_ids[0]) == 2
    pool.free(block_ids[:2])
    assert pool.num_free_blocks == 0  # still referenced once
    pool.free(block_ids)
    assert pool.num_free_blocks == 9 and all(pool.ref_count(b) == 0 for b in block_ids)
    with pytest.raises(AssertionError):
        pool.free(block_ids[:1])


def test_cached_free_blocks_are_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(num_blocks=5)
    b1, b2, b3, b4 = pool.allocate(4)
    hashes = {b: hash_block_tokens(None, [b] * BLOCK_SIZE) for b in (b1, b2, b3)}
    for block_id, block_hash in hashes.items():
        pool.cache_block(block_id, block_hash)
    for block_id in (b2, b1, b4, b3):
        pool.free([block_id])
    # Cached blocks stay findable while free; the uncached one is recycled first, then LRU order.
    assert all(pool.get_cached_block(h) == b for b, h in hashes.items())
    assert pool.allocate(1) == [b4]
    assert pool.get_cached_block(hashes[b2]) == b2
    assert pool.allocate(1) == [b2]
    assert pool.get_cached_block(hashes[b2]) is None and pool.block_hash(b2) is None
    assert pool.get_cached_block(hashes[b1]) == b1
    assert pool.allocate(1) == [b1]
    assert pool.get_cached_block(hashes[b3]) == b3


def test_touch_takes_a_cached_block_out_of_the_free_queue() -> None:
    pool = BlockPool(num_blocks=4)
    b1, b2, b3 = pool.allocate(3)
    pool.cache_block(b2, hash_block_tokens(None, [7, 7, 7, 7]))
    pool.free([b1, b2, b3])
    pool.touch([b2])  # a prefix hit on the block in the middle of the queue
    assert pool.num_free_blocks == 2 and pool.ref_count(b2) == 1
    assert sorted(pool.allocate(2)) == sorted([b1, b3])
    assert pool.get_cached_block(hash_block_tokens(None, [7, 7, 7, 7])) == b2  # never evicted


def test_duplicate_prefix_keeps_the_first_cached_block() -> None:
    pool = BlockPool(num_blocks=4)
    b1, b2 = pool.allocate(2)
    block_hash = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_block(b1, block_hash)
    pool.cache_block(b2, block_hash)
    assert pool.get_cached_block(block_hash) == b1 and pool.block_hash(b2) is None


def test_chained_hash_depends_on_the_parent() -> None:
    tokens = [5, 6, 7, 8]
    parent_a = hash_block_tokens(None, [1, 2, 3, 4])
    parent_b = hash_block_tokens(None, [1, 2, 3, 9])
    assert hash_block_tokens(parent_a, tokens) == hash_block_tokens(parent_a, list(tokens))
    assert hash_block_tokens(parent_a, tokens) != hash_block_tokens(parent_b, tokens)
    assert hash_block_tokens(None, tokens) != hash_block_tokens(parent_a, tokens)
    assert len(hash_block_tokens(None, tokens)) == 16  # 128-bit digest

    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    prefill(manager, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    # Same second block under a different first block: no hit at all.
    assert manager.get_computed_blocks(make_request("b", [1, 2, 3, 9, 5, 6, 7, 8, 0])) == ([], 0)
    # Same first block, different second: exactly one block.
    block_ids, num_hit = manager.get_computed_blocks(make_request("c", [1, 2, 3, 4, 5, 6, 7, 9, 0]))
    assert block_ids == manager.get_block_ids("a")[:1] and num_hit == 4


def test_prefix_hit_is_capped_one_token_short() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    prompt = list(range(100, 108))  # exactly two blocks
    a_blocks = prefill(manager, make_request("a", prompt))
    # The whole prompt is cached but its last token must be computed: one block less.
    block_ids, num_hit = manager.get_computed_blocks(make_request("b", prompt))
    assert (block_ids, num_hit) == (a_blocks[:1], 4)
    block_ids, num_hit = manager.get_computed_blocks(make_request("c", [*prompt, 1]))
    assert (block_ids, num_hit) == (a_blocks[:2], 8)


def test_prefix_hit_shares_blocks_and_counts_stats() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    a_blocks = prefill(manager, make_request("a", list(range(10))))  # 3 blocks, 2 full
    b = make_request("b", [*range(8), 50, 51, 52])
    b_blocks = prefill(manager, b)
    assert b_blocks[:2] == a_blocks[:2] and b_blocks[2] != a_blocks[2]
    assert manager.block_pool.ref_count(a_blocks[0]) == 2
    assert manager.num_free_blocks == 9 - 4
    assert manager.num_queried_tokens == 21 and manager.num_hit_tokens == 8
    assert manager.prefix_cache_hit_rate == pytest.approx(8 / 21)
    manager.free(b)
    assert manager.block_pool.ref_count(a_blocks[0]) == 1 and manager.num_free_blocks == 9 - 3


def test_free_is_tail_first_and_cached_blocks_survive() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)  # 3 usable blocks
    a = make_request("a", list(range(12)))
    a_blocks = prefill(manager, a)
    manager.free(a)
    # Freed tail first: allocating one block evicts the prompt's tail, its head stays cached.
    other = make_request("x", [99, 98, 97])
    assert manager.allocate_slots(other, 3) == [a_blocks[2]]
    block_ids, num_hit = manager.get_computed_blocks(make_request("b", list(range(12))))
    assert block_ids == a_blocks[:2] and num_hit == 8


def test_hit_on_free_blocks_counts_against_the_pool() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)  # 3 usable blocks
    a = make_request("a", list(range(8)))
    prefill(manager, a)
    manager.free(a)
    b = make_request("b", [*range(8), 1, 2, 3, 4, 5])  # hits 2 free blocks, needs 2 more
    hit_block_ids, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8 and manager.num_free_blocks == 3
    # 3 free blocks, but two of them are the hit: one left for the two new ones. Nothing is allocated.
    assert manager.allocate_slots(b, b.num_tokens - num_hit, hit_block_ids) is None
    assert manager.num_free_blocks == 3 and manager.get_block_ids("b") == []
    assert manager.allocate_slots(b, 4, hit_block_ids) is not None  # a chunk that fits
    assert manager.num_free_blocks == 0


def test_decode_allocates_a_block_only_at_a_boundary() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    a = make_request("a", [1, 2, 3])
    assert manager.allocate_slots(a, 3) is not None
    a.num_computed_tokens = 3
    a.append_output_token(4)
    assert manager.allocate_slots(a, 1) == []  # slot 3 of block 0
    a.num_computed_tokens = 4
    a.append_output_token(5)
    new_block_ids = manager.allocate_slots(a, 1)
    assert new_block_ids is not None and len(new_block_ids) == 1
    assert manager.get_block_ids("a")[1:] == new_block_ids


def test_kv_waste_counts_shared_blocks_once() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    assert manager.kv_waste() == 0.0
    prefill(manager, make_request("a", list(range(10))))  # 3 blocks, 10 tokens
    assert manager.kv_waste() == pytest.approx(2 / 12)
    prefill(manager, make_request("b", [*range(8), 7]))  # shares 2 full blocks, 1 token in its own
    assert manager.kv_waste() == pytest.approx((16 - 11) / 16)


def test_reset_prefix_cache_only_when_idle() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    prefill(manager, a)
    assert not manager.reset_prefix_cache()
    manager.free(a)
    assert manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


def test_disabled_caching_never_hits() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE, enable_caching=False)
    prefill(manager, make_request("a", list(range(9))))
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


def walk_kv_waste(manager: KVCacheManager, requests: list[Request]) -> float:
    """kv_waste by definition: every block of every live request, shared blocks counted once."""
    seen: set[int] = set()
    num_held = 0
    for request in requests:
        for index, block_id in enumerate(manager.get_block_ids(request.request_id)):
            if block_id not in seen:
                seen.add(block_id)
                num_held += min(BLOCK_SIZE, max(0, request.num_computed_tokens - index * BLOCK_SIZE))
    return (len(seen) * BLOCK_SIZE - num_held) / (len(seen) * BLOCK_SIZE) if seen else 0.0


def test_kv_waste_matches_a_walk_over_every_block() -> None:
    # kv_waste() does not walk block tables; check it against the definition while requests with shared
    # prefixes prefill, decode one token at a time across block boundaries and finish.
    manager = KVCacheManager(num_blocks=64, block_size=BLOCK_SIZE)
    shared = list(range(100, 109))
    live = [make_request(f"r{i}", [*shared, *range(i, i + 1 + 2 * i)]) for i in range(5)]
    for request in live:
        prefill(manager, request)
        assert manager.kv_waste() == pytest.approx(walk_kv_waste(manager, live))
    assert manager.block_pool.num_cached_blocks > 0 and manager.prefix_cache_hit_rate > 0
    for step in range(9):
        for request in live:
            request.append_output_token(step)
            assert manager.allocate_slots(request, 1) is not None
            request.num_computed_tokens += 1
            manager.cache_full_blocks(request, request.num_computed_tokens)
        assert manager.kv_waste() == pytest.approx(walk_kv_waste(manager, live))
        if step % 3 == 2:
            manager.free(live.pop(0))
            assert manager.kv_waste() == pytest.approx(walk_kv_waste(manager, live))
