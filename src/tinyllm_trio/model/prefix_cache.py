"""The prefix cache: reuse the keys and values of prompt prefixes a worker already computed.

Chat clients resend the whole conversation every turn, and applications put the same long
instructions in front of every prompt; without a cache each of those prefills from scratch.

Design: blocks and a hash chain (vLLM's scheme), not a radix tree (SGLang's). Our KV cache
stores each sequence in one contiguous row (the decode kernel streams a row's keys from
memory, `model/transformer.py`), so KV data cannot be shared page by page anyway: a cached
prefix is a whole parked row, reused by copying its first tokens into the new sequence's row
(a memory copy, ~100x cheaper than recomputing them). What the index must answer is only
"which row shares the longest prefix with this prompt", and a hash per block of
`BLOCK_TOKENS` tokens, chained over all blocks before it, answers that in one dict lookup per
block with no tree to keep balanced. The same `block_hashes` run in the server process give
the pool its prefix-aware routing table (`ipc/pool.py`) without shipping a tree around.

Matching is by whole blocks through the hash chain, then token by token into the matched row
(so a prefix ending mid-block is reused up to its last shared token). At most len(prompt) - 1
tokens are reused: the logits of the prompt's last position are the first token's, so at least
that one is always computed, even for a prompt that is entirely cached.

Entries: every active sequence's prompt (a later arrival can copy from a running sequence),
and the rows of finished sequences, parked in `KVCache` rows no active sequence uses, in LRU
order. An admitted sequence always gets a row: the cache only ever holds what is left over.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from tinyllm_trio.model.transformer import KVCache

BLOCK_TOKENS = 16


def block_hashes(ids: Sequence[int], block: int = BLOCK_TOKENS) -> list[int]:
    """One hash per whole block of `ids`, each over the block and every block before it.

    Tuples of ints hash the same in every process (PYTHONHASHSEED only salts str and bytes), so
    the server's routing table and a worker's cache agree on them.
    """
    out: list[int] = []
    h = 0
    for start in range(0, len(ids) - block + 1, block):
        h = hash((h, *ids[start : start + block]))
        out.append(h)
    return out


@dataclass(eq=False)
class _Entry:
    """A run of tokens whose keys and values some cache row holds (compared by identity)."""

    tokens: list[int]
    hashes: list[int]
    seq_id: Hashable | None = None  # set while it is an active sequence's prompt


class PrefixCache:
    """The index over one `KVCache`: lookups for admission, entries kept as sequences end."""

    def __init__(self, cache: KVCache, block: int = BLOCK_TOKENS) -> None:
        self.cache = cache
        self.block = block
        self._by_hash: dict[int, set[_Entry]] = {}
        self._active: dict[Hashable, _Entry] = {}
        self._parked: set[_Entry] = set()
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, tokens reused

    def lookup(self, ids: Sequence[int]) -> tuple[Hashable | None, int]:
        """The best source for `ids` (a `KVCache.claim` source) and how many tokens it gives
        (at most len(ids) - 1); (None, 0) when nothing is shared."""
        best: _Entry | None = None
        for h in block_hashes(ids, self.block):
            entries = self._by_hash.get(h)
            if not entries:
                break
            best = max(entries, key=self._recency)
        if best is None:
            return None, 0
        # the hashes chose the row; the tokens decide (a hash collision must not reuse keys)
        limit = min(len(ids) - 1, len(best.tokens))
        matched = 0
        while matched < limit and best.tokens[matched] == ids[matched]:
            matched += 1
        if matched == 0:
            return None, 0
        return (best.seq_id if best.seq_id is not None else best), matched

    def record(self, prompt_tokens: int, reused: int) -> None:
        """Count one admission that consulted the cache (vLLM's queries/hits, in tokens)."""
        self.queries += prompt_tokens
        self.hits += reused

    def started(self, seq_id: Hashable, prompt: Sequence[int]) -> None:
        """An admitted sequence's prompt is now in the cache: later arrivals may copy it."""
        entry = _Entry(list(prompt), block_hashes(prompt, self.block), seq_id)
        self._active[seq_id] = entry
        self._index(entry)

    def finished(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """End `seq_id`, keeping its row's `tokens` (those whose keys and values it holds)
        parked, unless an entry already holds all of them; parked entries that are a prefix
        of these tokens are dropped, as this one covers them."""
        entry = self._active.pop(seq_id, None)
        if entry is not None:
            self._unindex(entry)
        tokens = list(tokens)
        if len(tokens) < self.block:  # no whole block: no lookup could ever find it
            self.cache.drop(seq_id)
            return
        source, held = self.lookup([*tokens, -1])
        if held >= len(tokens) and source != seq_id:
            self.cache.drop(seq_id)
            return
        entry = _Entry(tokens, block_hashes(tokens, self.block))
        for old in self._candidates(entry):
            if old in self._parked and tokens[: len(old.tokens)] == old.tokens:
                self._forget(old)
        self.cache.park(seq_id, entry, len(tokens))
        self._parked.add(entry)
        self._index(entry)

    def forget(self, seq_id: Hashable) -> None:
        """An active sequence is gone without being kept (cancelled before admission, bypassed)."""
        entry = self._active.pop(seq_id, None)
        if entry is not None:
            self._unindex(entry)

    def sync(self) -> None:
        """Drop entries the KV cache evicted (an admission took their row)."""
        for entry in [e for e in self._parked if self.cache.parked_length(e) is None]:
            self._parked.discard(entry)
            self._unindex(entry)

    def clear(self) -> None:
        """Forget every parked entry (their rows are free again)."""
        for entry in list(self._parked):
            self._forget(entry)

    def stats(self) -> dict[str, int]:
        return {
            "queries": self.queries,
            "hits": self.hits,
            "entries": len(self._parked),
            "tokens": sum(len(e.tokens) for e in self._parked),
        }

    def _recency(self, entry: _Entry) -> int:
        """Active prompts first (they are certain to stay), then parked ones by LRU order."""
        if entry.seq_id is not None:
            return 1 << 30
        keys = self.cache.parked_keys
        return keys.index(entry) if entry in keys else -1

    def _candidates(self, entry: _Entry) -> set[_Entry]:
        return set(self._by_hash.get(entry.hashes[0], ())) if entry.hashes else set()

    def _forget(self, entry: _Entry) -> None:
        self.cache.evict(entry)
        self._parked.discard(entry)
        self._unindex(entry)

    def _index(self, entry: _Entry) -> None:
        for h in entry.hashes:
            self._by_hash.setdefault(h, set()).add(entry)

    def _unindex(self, entry: _Entry) -> None:
        for h in entry.hashes:
            entries = self._by_hash.get(h)
            if entries is not None:
                entries.discard(entry)
                if not entries:
                    del self._by_hash[h]
