"""Scheduler side: decides which chunks a request loads and which it publishes.

Runs on vLLM's scheduler thread only (no locks). Per request:

1. ``get_num_new_matched_tokens``: one lookup of the prompt's chunks (same host: the
   daemon's shared presence index, no RPC; otherwise one Lookup RPC), at most
   ``len(prompt) - 1`` tokens so vLLM still computes the last token's logits. With
   ``kvstore.partial_chunks`` (the default) those tokens end with a trailing partial chunk
   of their own key, so a prompt seen before loads all but its last token; without it the
   match ends at a chunk boundary. The answer is
   memoised per request (vLLM may ask again). Loads are synchronous (done in
   ``start_load_kv`` before the forward), so the async flag is always ``False``.
2. ``update_state_after_alloc``: records the range to load, ``[vLLM's computed, matched)``.
3. ``build_connector_meta``: turns the recorded ranges into :class:`LoadSpec` (with the
   blocks vLLM allocated) and plans a :class:`SaveSpec` when a whole chunk of the prompt
   becomes materialised (computed by the end of this step) and is not known to be stored,
   and for the trailing partial chunk once the reusable prompt (all but its last token) is.
4. ``request_finished``: forgets the request and reports ``kvstore.loaded_tokens`` and
   ``kvstore.lookup_ms`` (the lookup's own time, the connector's cost on a miss). Saves copy the KV out of the blocks during the
   step that computed it (worker side), so the blocks can be freed at once (``False``).

Preempted requests get their block table replaced when they resume (vLLM sends the whole
new table); nothing is kept across a preemption except what was already published.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ConnectorConfig
from .link import SidecarLink
from .metadata import FAULT_EVICT_AFTER_LOOKUP, KVStoreConnectorMetadata, LoadSpec, SaveSpec

log = logging.getLogger(__name__)


@dataclass
class _Request:
    prompt: list[int]
    block_ids: list[int] = field(default_factory=list)
    published_chunks: int = 0          #: chunks [0, n) are stored (found by lookup, or saved by us)
    tail_published: bool = False       #: so is the trailing partial chunk of the reusable prompt
    loaded_tokens: int = 0
    fault: str | None = None


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, link: SidecarLink, block_size: int) -> None:
        self.cfg = cfg
        self.link = link
        self.block_size = block_size
        self.chunk = cfg.chunk_tokens
        self._matched: dict[str, int] = {}                 # req -> stored prefix tokens (lookup memo)
        self._pending_loads: dict[str, tuple[int, int]] = {}   # req -> [start, end) tokens to load
        self._reqs: dict[str, _Request] = {}
        self._lookup_s: dict[str, float] = {}              # req -> seconds its lookup took
        self.lookups = 0
        self.hit_tokens = 0

    # -- 1 ------------------------------------------------------------------------------
    def reusable(self, prompt) -> int:
        """Prompt tokens a hit may cover: all but the last (vLLM computes its logits), cut at
        a chunk boundary unless trailing partial chunks are on."""
        n = max(0, len(prompt) - 1)
        return n if self.cfg.partial_chunks else n // self.chunk * self.chunk

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        prompt = request.prompt_token_ids or []
        reusable = self.reusable(prompt)
        if reusable <= num_computed_tokens:
            return 0, False
        matched = self._matched.get(request.request_id)
        if matched is None:
            self.lookups += 1
            t0 = time.perf_counter()
            matched = self.link.call(lambda c: c.lookup(prompt[:reusable], include_partial=True).matched_tokens, 0)
            self._lookup_s[request.request_id] = time.perf_counter() - t0
            self._matched[request.request_id] = matched
        return max(0, matched - num_computed_tokens), False

    # -- 2 ------------------------------------------------------------------------------
    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        st = self._request(request)
        matched = self._matched.pop(request.request_id, 0)
        st.published_chunks = max(st.published_chunks, matched // self.chunk)
        st.tail_published = st.tail_published or (matched > 0 and matched == self.reusable(st.prompt))
        if num_external_tokens > 0:
            end = matched
            self._pending_loads[request.request_id] = (end - num_external_tokens, end)
            st.loaded_tokens = num_external_tokens
            self.hit_tokens += num_external_tokens

    def _request(self, request: Any) -> _Request:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _Request(list(request.prompt_token_ids or []))
            params = getattr(request, "kv_transfer_params", None) or {}
            if self.cfg.fault_injection and params.get("kvstore.fault") == FAULT_EVICT_AFTER_LOOKUP:
                st.fault = FAULT_EVICT_AFTER_LOOKUP
            self._reqs[request.request_id] = st
        return st

    # -- 3 ------------------------------------------------------------------------------
    def build_meta(self, so: Any) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan(meta, new.req_id, st, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                st.block_ids.extend(new_blocks[0])
            self._plan(meta, req_id, st, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0))
        return meta

    def _plan(self, meta: KVStoreConnectorMetadata, req_id: str, st: _Request, computed_after_step: int) -> None:
        bs = self.block_size
        load = self._pending_loads.pop(req_id, None)
        if load is not None:
            start, end = load
            meta.loads.append(LoadSpec(req_id, tuple(st.prompt[:end]), start // bs,
                                       tuple(st.block_ids[start // bs:-(-end // bs)]), st.fault))
        if not self.cfg.save:
            return
        materialised = min(computed_after_step, len(st.prompt))
        publishable = materialised // self.chunk
        end = publishable * self.chunk if publishable > st.published_chunks else 0
        reusable = self.reusable(st.prompt)
        # The trailing partial chunk once the whole reusable prompt is computed (and so every
        # full chunk before it): one save publishes both.
        tail = reusable % self.chunk and not st.tail_published and materialised >= reusable
        if tail:
            end = reusable
        if end and len(st.block_ids) * bs >= end:
            meta.saves.append(SaveSpec(req_id, tuple(st.prompt[:end]), tuple(st.block_ids[:-(-end // bs)])))
            st.published_chunks = max(st.published_chunks, end // self.chunk)
            st.tail_published = st.tail_published or bool(tail)

    # -- 4 ------------------------------------------------------------------------------
    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        st = self._reqs.pop(rid, None)
        self._matched.pop(rid, None)
        self._pending_loads.pop(rid, None)
        loaded = st.loaded_tokens if st else 0
        lookup_ms = 1e3 * self._lookup_s.pop(rid, 0.0)
        return False, {"kvstore.loaded_tokens": loaded, "kvstore.lookup_ms": round(lookup_ms, 3)}
