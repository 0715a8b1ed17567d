"""Loads of stored chunks into vLLM's paged blocks: leased arena views, one copy.

:class:`LeasedLoader` leases a load's chunks (``KVStoreClient.leased_views``: on the same
host, read-only views of the daemon's shared arena) and scatters them straight into the
blocks (``scatter_leased``: one native strided copy per chunk on the CPU), so the scatter is
the load's only copy. No vLLM import: the benchmark measures this very code.

Pipelining: the chunks are leased in groups of about ``LOAD_GROUP_BYTES``. The lease of
group ``g + 1`` (the daemon checks each extent's CRC before granting it, on the daemon's
core) runs on the loader's prefetch thread while group ``g`` is scattered on the caller's
thread; each group's lease ends as soon as it is scattered, and a prefetched group that is
never scattered (an error) is released too.

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

#: Bytes leased per LeaseRead of a load: small enough that the next group's lease overlaps
#: this group's scatter, large enough that the RPC's fixed cost (~1 ms) stays small.
LOAD_GROUP_BYTES = 32 << 20


def _enter_lease(client, keys: list[bytes]):
    """``client.leased_views(keys)`` entered (on the prefetch thread); the caller exits it."""
    cm = client.leased_views(keys)
    return cm, cm.__enter__()


class LeasedLoader:
    def __init__(self, layout: PagedLayout, ns: Namespace) -> None:
        if ns.chunk_tokens % layout.block_size:
            raise ValueError(f"chunk of {ns.chunk_tokens} tokens is not a multiple of the block size "
                             f"{layout.block_size}")
        self.layout = layout
        self.ns = ns
        self.blocks_per_chunk = ns.chunk_tokens // layout.block_size
        self.group_chunks = max(1, LOAD_GROUP_BYTES // ns.chunk_bytes())
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="kvstore-lease")

    def load(self, client, tokens: Sequence[int], first_block: int, block_ids: Sequence[int]) -> int:
        """Writes the stored prefix of ``tokens``' whole chunks into the request's blocks
        ``block_ids`` (its blocks from ``first_block`` on; blocks before are vLLM's and left
        alone). Returns the tokens that arrived, counted from token 0 (at least the leading
        ``first_block`` blocks' tokens are not leased at all: chunks wholly before
        ``first_block`` are skipped). Client errors propagate (nothing stays leased)."""
        keys = client.keys(tokens)
        first = first_block // self.blocks_per_chunk
        size = self.group_chunks
        groups = [(s, keys[s:s + size]) for s in range(first, len(keys), size)]
        streaming = (len(keys) - first) * self.ns.chunk_bytes() >= STREAMING_LOAD_BYTES
        got = first * self.ns.chunk_tokens
        pending = self._prefetch.submit(_enter_lease, client, groups[0][1]) if groups else None
        try:
            for g, (start, group) in enumerate(groups):
                cm, lv = pending.result()
                pending = None
                try:
                    full = lv.matched == len(group)
                    if full and g + 1 < len(groups):
                        pending = self._prefetch.submit(_enter_lease, client, groups[g + 1][1])
                    scatter_leased(self.layout, lv, first_block, block_ids, chunk_base=start, streaming=streaming)
                    got = (start + lv.matched) * self.ns.chunk_tokens
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

    def close(self) -> None:
        self._prefetch.shutdown(wait=True)
