"""vLLM's KV-events wire format, written with plain ``msgpack`` (docs/events.md byte for byte).

vLLM defines the events as msgspec structs (``vllm/distributed/kv_events.py``) tagged by
class name. Two layouts exist in the field, selected by ``events.encoding``:

ARRAY (vLLM up to the release that dropped ``array_like=True``; what llm-d's kv-cache
manager, AIBrix and the production-stack router decode: positional, tag first)::

    batch        = [ts: float64, events: [event...], data_parallel_rank: int]
    BlockStored  = ["BlockStored", block_hashes, parent_block_hash | nil, token_ids,
                    block_size, lora_id | nil, medium, lora_name | nil]
    BlockRemoved = ["BlockRemoved", block_hashes, medium]
    AllBlocksCleared = ["AllBlocksCleared"]

MAP (current vLLM main: msgspec structs without ``array_like``; tag under key ``type``,
fields equal to their defaults omitted)::

    batch        = {"ts": .., "events": [..], "data_parallel_rank": ..}
    BlockStored  = {"type": "BlockStored", "block_hashes": .., "parent_block_hash": ..,
                    "token_ids": .., "block_size": .., "lora_id": .., "medium": .., "lora_name": ..}
    BlockRemoved = {"type": "BlockRemoved", "block_hashes": .., "medium": ..}
    AllBlocksCleared = {"type": "AllBlocksCleared"}

Block hashes are the chunk keys (32 bytes, ``bin 8``) or, with ``block_hash = "u64"``, the
first 8 bytes of the key as an unsigned big-endian integer. ``medium`` is "DRAM", "DISK" or
"REMOTE". The sidecar does not know the token ids or the parent of a chunk from a tier
listener, so ``token_ids`` is empty and ``parent_block_hash`` nil.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from ..config import EventEncoding
from ..types import Medium

MEDIUM_NAMES = {Medium.HBM: "GPU", Medium.DRAM: "DRAM", Medium.DISK: "DISK", Medium.REMOTE: "REMOTE"}


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list
    medium: str
    block_size: int
    parent_block_hash: object = None
    token_ids: tuple = ()
    lora_id: int | None = None
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list
    medium: str


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


def _event(e: Event, enc: EventEncoding):
    if isinstance(e, BlockStored):
        if enc is EventEncoding.ARRAY:
            return ["BlockStored", e.block_hashes, e.parent_block_hash, list(e.token_ids), e.block_size,
                    e.lora_id, e.medium, e.lora_name]
        return {"type": "BlockStored", "block_hashes": e.block_hashes, "parent_block_hash": e.parent_block_hash,
                "token_ids": list(e.token_ids), "block_size": e.block_size, "lora_id": e.lora_id,
                "medium": e.medium, "lora_name": e.lora_name}
    if isinstance(e, BlockRemoved):
        if enc is EventEncoding.ARRAY:
            return ["BlockRemoved", e.block_hashes, e.medium]
        return {"type": "BlockRemoved", "block_hashes": e.block_hashes, "medium": e.medium}
    return ["AllBlocksCleared"] if enc is EventEncoding.ARRAY else {"type": "AllBlocksCleared"}


def encode_batch(ts: float, events: list[Event], dp_rank: int, enc: EventEncoding) -> bytes:
    evs = [_event(e, enc) for e in events]
    obj = [ts, evs, dp_rank] if enc is EventEncoding.ARRAY else {"ts": ts, "events": evs, "data_parallel_rank": dp_rank}
    return msgpack.packb(obj, use_bin_type=True)
