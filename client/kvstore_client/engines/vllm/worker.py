"""Worker side: copies chunks between the sidecar and vLLM's paged blocks.

Thread model: ``start_load``, ``save`` and ``take_load_errors`` run on the worker's model
thread; stores run on one background thread (:class:`~kvstore_client.engines.StoreQueue`),
each on its own gathered buffer, so nothing the background thread reads is in vLLM's blocks.

- Load (before the forward): the chunks are leased (``leased_views``: same host, read-only
  views of the shared arena extents) and scattered straight into the blocks by one native
  strided copy per chunk, the only copy; the lease ends right after. Blocks of chunks that did not arrive (evicted, corrupt, sidecar gone)
  are recorded and reported through ``get_block_ids_with_load_errors``, so vLLM recomputes
  them (``kv_load_failure_policy="recompute"``).
- Save (``wait_for_save``, after the forward): the blocks of newly materialised chunks are
  gathered into a fresh buffer (the only work on the forward's thread), and the store runs
  in the background; a store that fails is logged and the chunks are merely not cached.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import torch

from kvstore_wire.keys import Namespace

from .._base import StoreQueue
from .config import ConnectorConfig
from .layout import PagedLayout
from .loader import LeasedLoader
from .link import SidecarLink
from .metadata import FAULT_EVICT_AFTER_LOOKUP, KVStoreConnectorMetadata, LoadSpec, SaveSpec

log = logging.getLogger(__name__)

#: Stores waiting beyond this are dropped (counted): the engine never waits on the sidecar.
MAX_PENDING_STORES = 8
_TORCH_DTYPES = {"FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "FLOAT32": torch.float32,
                 "FLOAT8_E4M3": torch.float8_e4m3fn}


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, link: SidecarLink, ns: Namespace, block_size: int,
                 cpu_split: str | None = None) -> None:
        self.cfg = cfg
        self.link = link
        self.ns = ns
        self.block_size = block_size
        self.dtype = _TORCH_DTYPES[ns.dtype.name]
        self.layout: PagedLayout | None = None
        self.cpu_split = cpu_split      #: how CPU_ATTN tiles hold K and V (layout.probe_cpu_tile)
        self._load_errors: set[int] = set()
        self._stores = StoreQueue(MAX_PENDING_STORES)
        self._loader: LeasedLoader | None = None
        self.stats = {"loaded_tokens": 0, "failed_blocks": 0, "load_s": 0.0, "saved_chunks": 0, "gather_s": 0.0}

    def register(self, kv_caches: Mapping[str, torch.Tensor], backends: Mapping[str, str]) -> None:
        self.layout = PagedLayout(kv_caches, backends, self.ns, self.block_size,
                                  **({"cpu_split": self.cpu_split} if self.cpu_split else {}))
        self._loader = LeasedLoader(self.layout, self.ns)
        first = self.layout.layers[0].k
        if first.dtype != self.dtype:
            raise ValueError(f"vLLM's KV cache is {first.dtype}, the namespace says {self.ns.dtype.name}")

    # -- loads ----------------------------------------------------------------------------
    def start_load(self, meta: KVStoreConnectorMetadata) -> None:
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        t0 = time.perf_counter()
        n = len(spec.tokens)
        if spec.fault == FAULT_EVICT_AFTER_LOOKUP:
            self.link.call(lambda c: c.delete(c.keys(spec.tokens, include_partial=True)[1:]), 0)
        lossy_before = self._loader.lossy_tails
        got = self.link.call(lambda c: self._loader.load(c, spec.tokens, spec.first_block, spec.block_ids), 0)
        lossy_tail = self._loader.lossy_tails > lossy_before and got == n - n % self.ns.chunk_tokens
        # Blocks wholly arrived; the last one also when the load ends inside it (the tokens
        # vLLM computes next go into its other rows).
        arrived = -(-got // self.block_size) if got >= n else got // self.block_size
        good = max(0, min(len(spec.block_ids), arrived - spec.first_block))
        failed = spec.block_ids[good:]
        if failed and lossy_tail:
            log.info("kvstore connector: request %s: the trailing partial chunk came from a lossy tier; vLLM "
                     "recomputes its %d tokens exactly", spec.req_id, n - got)
            self._load_errors.update(failed)
        elif failed:
            log.warning("kvstore connector: %d of %d blocks of request %s did not load (%d of %d tokens arrived); "
                        "vLLM recomputes them", len(failed), len(spec.block_ids), spec.req_id, got, n)
            self._load_errors.update(failed)
            self.stats["failed_blocks"] += len(failed)
        dt = time.perf_counter() - t0
        loaded = min(n, (spec.first_block + good) * self.block_size) - spec.first_block * self.block_size
        self.stats["loaded_tokens"] += loaded
        self.stats["load_s"] += dt
        log.info("kvstore connector: request %s loaded %d tokens into %d blocks in %.1f ms", spec.req_id,
                 loaded, good, dt * 1e3)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ----------------------------------------------------------------------------
    def save(self, meta: KVStoreConnectorMetadata) -> None:
        for spec in meta.saves:
            self._save(spec)

    def _save(self, spec: SaveSpec) -> None:
        t0 = time.perf_counter()
        out = torch.empty(self.ns.chunk_shape(len(spec.block_ids) * self.block_size), dtype=self.dtype)
        self.layout.gather(spec.block_ids, out)
        self.stats["gather_s"] += time.perf_counter() - t0
        tokens, durability = spec.tokens, self.cfg.durability

        def store() -> int:
            return self.link.call(lambda c: c.store(tokens, out, durability=durability, include_partial=True), 0)

        self._stores.submit(store)

    def flush(self, timeout_s: float | None = None) -> None:
        self._stores.flush(timeout_s)
        self.stats["saved_chunks"] = self._stores.stored_chunks

    def close(self) -> None:
        try:
            self._stores.close(timeout_s=self.cfg.timeout_s)
        finally:
            if self._loader is not None:
                self._loader.close()
            self.link.close()


