"""``KVStoreConnector``: vLLM V1's KV connector API over the kvstore sidecar.

Registered out of tree (no vLLM patch)::

    kv_transfer_config={"kv_connector": "KVStoreConnector",
                        "kv_connector_module_path": "kvstore_client.engines.vllm",
                        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {"kvstore.addr": "127.0.0.1:50051"}}

vLLM builds one instance per role: the SCHEDULER one delegates to :class:`SchedulerSide`,
each WORKER one to :class:`WorkerSide`; each has its own :class:`SidecarLink`. The
contract is the docstrings of ``vllm/distributed/kv_transfer/kv_connector/v1/base.py``
(vLLM 0.32); this class only routes calls.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .config import ConnectorConfig
from .layout import OPAQUE, TOKEN_EXACT, backend_names, probe_cpu_tile
from .link import SidecarLink
from .metadata import KVStoreConnectorMetadata
from .namespace import namespace_for
from .scheduler import SchedulerSide
from .worker import _TORCH_DTYPES, WorkerSide

log = logging.getLogger(__name__)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError, ImportError):   # no TP group (single process)
        return 0


class KVStoreConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.cfg = self.cfg.for_block_size(self.block_size)
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning("kvstore connector: kv_load_failure_policy is %r: a chunk evicted between lookup and load "
                        "fails its request; set it to \"recompute\" (docs/vllm.md)",
                        self._kv_transfer_config.kv_load_failure_policy)
        rank = 0 if role == KVConnectorRole.SCHEDULER else _tp_rank()
        self.namespace = namespace_for(vllm_config, self.cfg.chunk_tokens, self.cfg.model_id, tp_rank=rank)
        self.cpu_split = None
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # Both roles probe the same kernel, so they agree on the namespace and on whether
            # chunks may end inside a block.
            ns = self.namespace
            self.cpu_split, isa = probe_cpu_tile(_TORCH_DTYPES[ns.dtype.name], self.block_size, ns.num_kv_heads,
                                                 ns.head_dim)
            if self.cpu_split == OPAQUE:
                # Blocks in a tile order this connector does not know: never shared with
                # engines that store the namespace layout.
                self.namespace = replace(ns, model=f"{ns.model}#vllm-cpu-{isa}-blocks")
            if self.cpu_split not in TOKEN_EXACT:
                self.cfg = replace(self.cfg, partial_chunks=False)
        link = SidecarLink(self.cfg, self.namespace)
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(self.cfg, link, self.block_size)
        else:
            self._worker = WorkerSide(self.cfg, link, self.namespace, self.block_size, self.cpu_split)
        log.info("kvstore connector (%s): sidecar %s, namespace %s, chunk %d tokens", role.name, self.cfg.addr,
                 self.namespace.model, self.cfg.chunk_tokens)
        # Connect now (map the arena and the presence index), not in the first request's
        # TTFT; a sidecar that is down is a miss now and is retried later, as always.
        link.client()

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches, backend_names(self._vllm_config, list(kv_caches)))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return   # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return   # saves gather every layer at once in wait_for_save

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, KVStoreConnectorMetadata)
            self._worker.save(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._sched.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        return self._sched.build_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.finished(request)
