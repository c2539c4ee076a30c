"""KV-cache blocks: a fixed pool shared by all requests (no torch here), with prefix caching.

A sequence owns a block table: the ids of the blocks that hold its keys and values, in
order; token p of the sequence lives in block table[p // block_size], row p % block_size.

Prefix caching: a block whose block_size tokens are all computed is registered under its
tokens and the hash of everything before them. A new request whose prompt starts with
registered blocks shares them (reference counts) and computes only the rest: a chat's next
turn prefills the new message, not the whole conversation. A block nobody references goes
back to the free pool but keeps its registration until the pool hands it out again, least
recently freed first, so recent prefixes survive while memory allows. Keys are compared
whole (tokens and the prefix's hash), so two different blocks never share an entry."""
from __future__ import annotations

from typing import Protocol

ROOT = 0   # the "prefix hash" before a sequence's first block


class Cacheable(Protocol):
    block_table: list[int]
    block_hashes: list[int]        # prefix hash after each of the sequence's registered blocks

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, count: int) -> list[int]: ...


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))   # insertion order: reuse oldest first
        self.refs = [0] * num_blocks
        self.cached: dict[tuple[int, tuple[int, ...]], int] = {}        # (prefix hash, tokens) -> block
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.hit_tokens = self.queried_tokens = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks that requests hold (free blocks that still cache a prefix count as free)."""
        return 1 - len(self.free) / self.num_blocks

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table in place to hold num_tokens; False (and no change) if the
        pool has too few free blocks."""
        needed = self.blocks_for(num_tokens) - len(block_table)
        if needed <= 0:
            return True
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block = next(iter(self.free))
            del self.free[block]
            key = self.key_of.pop(block, None)
            if key is not None:   # its cached prefix is overwritten from now on
                del self.cached[key]
            self.refs[block] = 1
            block_table.append(block)
        return True

    def release(self, block_table: list[int]) -> None:
        """Drop a sequence's references and empty its table; unreferenced blocks go back to
        the pool, the table's last blocks first (a prefix's first blocks are the most shared)."""
        for block in reversed(block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
        block_table.clear()

    def trim(self, block_table: list[int], num_tokens: int) -> int:
        """Give back the blocks of block_table beyond num_tokens (taken for drafted tokens that
        were rejected: never registered, never shared); returns how many."""
        keep = self.blocks_for(num_tokens)
        extra = len(block_table) - keep
        if extra > 0:
            self.release(block_table[keep:])
            del block_table[keep:]
        return max(extra, 0)

    def reuse_prefix(self, sequence: Cacheable) -> int:
        """For a sequence with no blocks yet: share the registered blocks its tokens start
        with, and return how many tokens they hold. The last token is always left to compute
        (its logits are needed), and shared blocks are never written again."""
        if not self.prefix_caching or sequence.block_table:
            return 0
        usable = (sequence.num_tokens - 1) // self.block_size
        hashes, prefix = [], ROOT
        for index in range(usable):
            key = self._key(sequence, index, prefix)
            block = self.cached.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            sequence.block_table.append(block)
            prefix = hash(key)
            hashes.append(prefix)
        sequence.block_hashes = hashes
        return len(hashes) * self.block_size

    def count_reuse(self, num_tokens: int, num_cached_tokens: int) -> None:
        """A sequence started with num_cached_tokens of its num_tokens from the cache."""
        self.queried_tokens += num_tokens
        self.hit_tokens += num_cached_tokens

    def register(self, sequence: Cacheable, num_computed_tokens: int) -> None:
        """Register the sequence's blocks that num_computed_tokens has just filled."""
        if not self.prefix_caching:
            return
        hashes = sequence.block_hashes
        for index in range(len(hashes), num_computed_tokens // self.block_size):
            key = self._key(sequence, index, hashes[-1] if hashes else ROOT)
            block = sequence.block_table[index]
            if key not in self.cached and block not in self.key_of:
                self.cached[key] = block
                self.key_of[block] = key
            hashes.append(hash(key))

    def _key(self, sequence: Cacheable, index: int, prefix: int) -> tuple[int, tuple[int, ...]]:
        return prefix, tuple(sequence.token_ids(index * self.block_size, self.block_size))
