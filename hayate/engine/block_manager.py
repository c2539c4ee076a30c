"""KV-cache blocks: a fixed pool shared by all requests (no torch here).

A sequence owns a block table: the ids of the blocks that hold its keys and values, in
order; token p of the sequence lives in block table[p // block_size], row p % block_size."""
from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1 - len(self.free_blocks) / self.num_blocks

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table in place to hold num_tokens; False (and no change) if the
        pool has too few free blocks."""
        needed = self.blocks_for(num_tokens) - len(block_table)
        if needed <= 0:
            return True
        if needed > len(self.free_blocks):
            return False
        block_table.extend(self.free_blocks.popleft() for _ in range(needed))
        return True

    def release(self, block_table: list[int]) -> None:
        """Return a sequence's blocks to the pool and empty its table."""
        self.free_blocks.extend(block_table)
        block_table.clear()
