"""Loads of stored chunks into vLLM's paged blocks: leased arena views, one copy.

:class:`LeasedLoader` leases a load's chunks (``KVStoreClient.leased_views``: on the same
host, read-only views of the daemon's shared arena) and scatters them straight into the
blocks (``scatter_leased``: one native strided copy per chunk on the CPU), so the scatter is
the load's only copy. No vLLM import: the benchmark measures this very code.

Pipelining: the chunks are leased in ``LOAD_GROUPS`` groups (one for small loads). The
lease of group ``g + 1`` (the daemon checks each extent's CRC before granting it, on the daemon's
core) runs on the loader's prefetch thread while group ``g`` is scattered on the caller's
thread (with ``SCATTER_THREADS`` threads); each group's lease ends as soon as it is
scattered, and a prefetched group that is never scattered (an error) is released too.

Thread model: ``load`` is called from one thread at a time (vLLM's worker thread); the
prefetch thread only enters leases.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from kvstore_wire.keys import Namespace

from .layout import STREAMING_LOAD_BYTES, PagedLayout, scatter_leased

log = logging.getLogger(__name__)

#: A load is leased in at most this many LeaseReads: the second group's lease (mostly the
#: daemon's CRC check) overlaps the first group's scatter; more groups cost more in fixed
#: RPC time (1-6 ms each on a loaded machine) than they overlap.
LOAD_GROUPS = 2
#: Loads smaller than this take one LeaseRead (nothing worth overlapping).
MIN_GROUP_BYTES = 16 << 20
#: Threads scattering one group (the caller and the rest from the loader's pool): one thread
#: does not reach the memory bandwidth with head-sized (256 B) pieces.
SCATTER_THREADS = 2


def _enter_lease(client, keys: list[bytes], last_tokens: int = 0):
    """``client.leased_views(keys, last_tokens=...)`` entered (on the prefetch thread); the
    caller exits it."""
    cm = client.leased_views(keys, last_tokens=last_tokens)
    return cm, cm.__enter__()


class LeasedLoader:
    def __init__(self, layout: PagedLayout, ns: Namespace) -> None:
        if ns.chunk_tokens % layout.block_size:
            raise ValueError(f"chunk of {ns.chunk_tokens} tokens is not a multiple of the block size "
                             f"{layout.block_size}")
        self.layout = layout
        self.ns = ns
        self.blocks_per_chunk = ns.chunk_tokens // layout.block_size
        self.group_chunks: int | None = None      #: chunks per LeaseRead; None: LOAD_GROUPS groups
        self.lossy_tails = 0                      #: partial chunks left to vLLM: they came lossy
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="kvstore-lease")
        self._scatter = ThreadPoolExecutor(SCATTER_THREADS - 1, thread_name_prefix="kvstore-scatter") \
            if SCATTER_THREADS > 1 else None

    def load(self, client, tokens: Sequence[int], first_block: int, block_ids: Sequence[int]) -> int:
        """Writes the stored prefix of ``tokens``' chunks into the request's blocks
        ``block_ids`` (its blocks from ``first_block`` on; blocks before are vLLM's and left
        alone). ``tokens`` that do not end on a chunk boundary end with a trailing partial
        chunk, loaded like the others (its last block gets only its rows). Returns the tokens
        that arrived, counted from token 0 (at least the leading ``first_block`` blocks'
        tokens are not leased at all: chunks wholly before ``first_block`` are skipped).
        Client errors propagate (nothing stays leased)."""
        keys = client.keys(tokens, include_partial=True)
        tail = client.tail_tokens(tokens)
        first = first_block // self.blocks_per_chunk
        todo = max(0, len(keys) - first)
        size = self.group_chunks or max(-(-todo // LOAD_GROUPS), MIN_GROUP_BYTES // self.ns.chunk_bytes(), 1)
        groups = [(s, keys[s:s + size], tail if s + size >= len(keys) else 0) for s in range(first, len(keys), size)]
        streaming = (len(keys) - first) * self.ns.chunk_bytes() >= STREAMING_LOAD_BYTES
        got = first * self.ns.chunk_tokens
        pending = self._prefetch.submit(_enter_lease, client, *groups[0][1:]) if groups else None
        try:
            for g, (start, group, _) in enumerate(groups):
                cm, lv = pending.result()
                pending = None
                try:
                    full = lv.matched == len(group)
                    if full and g + 1 < len(groups):
                        pending = self._prefetch.submit(_enter_lease, client, *groups[g + 1][1:])
                    if full and tail and g + 1 == len(groups) and lv.chunks[-1].lossy:
                        # A lossy tier's partial chunk is the query's nearest context, where
                        # approximate KV costs the most quality for the least compute saved:
                        # vLLM recomputes it (fewer than a chunk of tokens) exactly.
                        lv.chunks = lv.chunks[:-1]
                        full = False
                        self.lossy_tails += 1
                    self._scatter_group(lv, first_block, block_ids, start, streaming)
                    got = start * self.ns.chunk_tokens + lv.matched_tokens
                finally:
                    cm.__exit__(None, None, None)
                if not full:
                    break
        finally:
            if pending is not None:      # leased ahead, never scattered (an error above): release it
                try:
                    pending.result()[0].__exit__(None, None, None)
                except Exception as e:  # noqa: BLE001 - the error above is the one that propagates
                    log.debug("kvstore connector: the prefetched lease failed too: %s", e)
        return got

    def _scatter_group(self, lv, first_block: int, block_ids: Sequence[int], start: int, streaming: bool) -> None:
        """One group's chunks, split over ``SCATTER_THREADS`` threads (each chunk owns its
        own blocks; the native copy releases the GIL)."""
        parts = [lv.chunks[k::SCATTER_THREADS] for k in range(SCATTER_THREADS)] if self._scatter else [lv.chunks]
        futures = [self._scatter.submit(scatter_leased, self.layout, lv, first_block, block_ids, start, streaming,
                                        part) for part in parts[1:] if part]
        try:
            scatter_leased(self.layout, lv, first_block, block_ids, start, streaming, parts[0])
        finally:
            for f in futures:
                f.result()

    def close(self) -> None:
        self._prefetch.shutdown(wait=True)
        if self._scatter is not None:
            self._scatter.shutdown(wait=True)
