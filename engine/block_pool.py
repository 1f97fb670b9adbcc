"""BlockPool: the fixed set of KV blocks, their ref counts, the free queue and the prefix-cache hash map.

Pure Python over block ids; the KV tensors live in the model runner, indexed by the same ids."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# Block 0 is reserved and never handed out: the model runner may point padding entries of block_tables
# and slot_mapping (CUDA-graph padding, unused rows) at it without touching any request's KV.
NULL_BLOCK_ID = 0

# A block's identity in the prefix cache: a 128-bit digest chained over every token up to the block's end.
BlockHash = bytes


def hash_block_tokens(parent_block_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The chained hash of one full block: blake2b-128 over (parent digest, the block's token ids).

    We keep no token ids in cached blocks and trust the 128-bit digest instead: with n cached blocks a
    collision has probability about n^2 / 2^129, far below the odds of a hardware fault. Chaining makes
    equal tokens under a different prefix hash differently, so a hit always means the whole prefix matches.
    """
    hasher = hashlib.blake2b(digest_size=16)
    if parent_block_hash is not None:
        hasher.update(parent_block_hash)
    hasher.update(array("q", token_ids).tobytes())
    return hasher.digest()


class BlockPool:
    """Blocks 1..num_blocks-1 with ref counts; free ones wait in an LRU queue and may still be cached.

    The free queue is an OrderedDict used as an O(1) linked list: `allocate` takes from the front, `free`
    puts cached blocks at the back (so the least recently freed cached block is evicted first) and
    uncached ones at the front (they hold nothing worth keeping). A prefix hit takes a cached free block
    out of the middle in O(1).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {NULL_BLOCK_ID} is reserved as the null "
                             f"block), got {num_blocks}; give the KV cache more memory or blocks")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._hash_to_block_id: dict[BlockHash, int] = {}
        self._free_queue: OrderedDict[int, None] = OrderedDict(
            (block_id, None) for block_id in range(num_blocks) if block_id != NULL_BLOCK_ID)
        self._ref_counts[NULL_BLOCK_ID] = 1  # pinned forever

    @property
    def num_total_blocks(self) -> int:
        """Blocks a request can use (the null block excluded)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_hashes[block_id]

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding this prefix (in use or free but not yet evicted), or None."""
        return self._hash_to_block_id.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take num_blocks from the front of the free queue, evicting whatever prefix they cached."""
        assert num_blocks <= len(self._free_queue), "caller must check num_free_blocks first"
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Share blocks found by a prefix hit: bump ref counts, taking free ones out of the queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per block, in the given order (callers pass a request's blocks tail first)."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0 and block_id != NULL_BLOCK_ID, f"double free of {block_id}"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_queue[block_id] = None
                if self._block_hashes[block_id] is None:
                    self._free_queue.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Make a full block findable by its chained hash.

        When another block already holds the same prefix (two requests computed it at once), the first one
        stays the cached copy and this block remains uncached, to be recycled first once freed."""
        if not self.enable_caching or block_hash in self._hash_to_block_id:
            return
        assert self._block_hashes[block_id] is None, f"block {block_id} is already cached"
        self._block_hashes[block_id] = block_hash
        self._hash_to_block_id[block_hash] = block_id

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. between a benchmark's warm-up and its timed run).

        Only possible while no block is in use; returns whether it happened."""
        if self.num_free_blocks != self.num_total_blocks:
            return False
        for block_id in self._hash_to_block_id.values():
            self._block_hashes[block_id] = None
        self._hash_to_block_id.clear()
        return True

    def _evict(self, block_id: int) -> None:
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:
            del self._hash_to_block_id[block_hash]
            self._block_hashes[block_id] = None
