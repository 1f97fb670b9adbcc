"""KVCacheManager: the one owner of per-request block tables and of their prefix-cache hashes.

It turns "this request needs n more tokens of KV" into block ids from the BlockPool, and back."""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_pool import BlockHash, BlockPool, hash_block_tokens
from engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._req_to_blocks: dict[str, list[int]] = {}
        # Chained hashes of the request's full blocks, extended as blocks fill: never rehashed whole.
        self._req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of the request are registered in the prefix cache already.
        self._req_to_num_cached_blocks: dict[str, int] = {}
        self._req_to_request: dict[str, Request] = {}  # live requests, for kv_waste
        self.num_queried_tokens = 0  # tokens of newly admitted requests looked up in the prefix cache
        self.num_hit_tokens = 0  # ...and those found there

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_total_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def get_block_ids(self, req_id: str) -> list[int]:
        return list(self._req_to_blocks.get(req_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of a request not yet admitted: (block ids, number of tokens).

        Capped one token short of the request so that its last token is always computed (it yields the
        logits of the next token): a prompt of 8 tokens with blocks of 4 can hit one block, not two."""
        if not self.enable_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for index in range(max_hit_blocks):
            block_hash = self._block_hashes(request, index + 1)[index]
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_block_ids: Sequence[int] = ()) -> list[int] | None:
        """Make room for num_computed + hit + num_new_tokens tokens; return the newly allocated block ids.

        new_computed_block_ids is a prefix hit from get_computed_blocks, not yet counted in
        request.num_computed_tokens. Returns None, allocating nothing, when the pool is short."""
        req_id = request.request_id
        blocks = self._req_to_blocks.get(req_id)
        if (blocks is not None and not new_computed_block_ids
                and request.num_computed_tokens + num_new_tokens <= len(blocks) * self.block_size):
            return []  # the common decode: the next token still fits the last block
        is_new = blocks is None
        if blocks is None:
            blocks = []
        num_tokens = (request.num_computed_tokens + len(new_computed_block_ids) * self.block_size
                      + num_new_tokens)
        num_required_blocks = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_required_blocks - len(blocks) - len(new_computed_block_ids))
        # Hit blocks sitting in the free queue stop being free once touched: they are not ours to allocate.
        num_free_hits = sum(1 for block_id in new_computed_block_ids if self.block_pool.ref_count(block_id) == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_free_hits:
            return None

        if is_new:
            self._req_to_blocks[req_id] = blocks
            self._req_to_request[req_id] = request
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += len(new_computed_block_ids) * self.block_size
        if new_computed_block_ids:
            assert len(blocks) == 0, "a prefix hit only applies to a request holding no blocks"
            self.block_pool.touch(new_computed_block_ids)  # before allocate, so they cannot be evicted
            blocks.extend(new_computed_block_ids)
            self._req_to_num_cached_blocks[req_id] = len(new_computed_block_ids)
        new_block_ids = self.block_pool.allocate(num_new_blocks)
        blocks.extend(new_block_ids)
        return new_block_ids

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the blocks that became full (their KV computed) so later requests can hit them."""
        if not self.enable_caching:
            return
        req_id = request.request_id
        num_full_blocks = num_computed_tokens // self.block_size
        num_cached_blocks = self._req_to_num_cached_blocks.get(req_id, 0)
        if num_full_blocks <= num_cached_blocks:
            return
        blocks = self._req_to_blocks[req_id]
        block_hashes = self._block_hashes(request, num_full_blocks)
        for index in range(num_cached_blocks, num_full_blocks):
            self.block_pool.cache_block(blocks[index], block_hashes[index])
        self._req_to_num_cached_blocks[req_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release a finished or preempted request's blocks, tail first: a prompt's tail is evicted first."""
        req_id = request.request_id
        blocks = self._req_to_blocks.pop(req_id, [])
        self.block_pool.free(reversed(blocks))
        self._req_to_block_hashes.pop(req_id, None)
        self._req_to_num_cached_blocks.pop(req_id, None)
        self._req_to_request.pop(req_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def kv_waste(self) -> float:
        """(allocated slots - tokens held) / allocated slots over live requests, shared blocks once.

        A request holds num_computed_tokens tokens of KV. A block held by two requests is a prefix hit,
        full and computed for both, so waste is only ever in a request's own blocks past its computed
        tokens: O(requests), not a walk over every block table (it ran at batch 256 every few steps)."""
        num_slots = (self.block_pool.num_total_blocks - self.block_pool.num_free_blocks) * self.block_size
        if not num_slots:
            return 0.0
        num_wasted = 0
        for req_id, blocks in self._req_to_blocks.items():
            num_req_slots = len(blocks) * self.block_size
            num_wasted += num_req_slots - min(self._req_to_request[req_id].num_computed_tokens, num_req_slots)
        return num_wasted / num_slots

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The request's chained block hashes, extended (only the missing ones) to num_blocks."""
        block_hashes = self._req_to_block_hashes.setdefault(request.request_id, [])
        token_ids = request.all_token_ids
        size = self.block_size
        for index in range(len(block_hashes), num_blocks):
            parent = block_hashes[-1] if block_hashes else None
            block_hashes.append(hash_block_tokens(parent, token_ids[index * size:(index + 1) * size]))
        return block_hashes
