"""What the scheduler side tells the worker side each step (pickled to the workers).

Token ranges start at the request's first token, because prefix keys are chained from
there, and are whole chunks, or whole chunks and a trailing partial chunk (``tokens`` not a
multiple of the chunk: ``kvstore.partial_chunks``); ``block_ids`` are the request's blocks
that the range touches, starting at ``first_block`` (an index into the request's block
table, i.e. token ``first_block * N``), the last one partly when the range ends inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

#: The only fault a request may ask for, and only where ``kvstore.fault_injection`` is on:
#: every chunk but the first is deleted from the store between lookup and load.
FAULT_EVICT_AFTER_LOOKUP = "evict_after_lookup"


@dataclass(frozen=True)
class LoadSpec:
    req_id: str
    tokens: tuple[int, ...]        #: chunks [0, len/C) are retrieved (keys chain from token 0)
    first_block: int               #: blocks before it are already computed by vLLM: not written
    block_ids: tuple[int, ...]     #: destinations of blocks first_block, first_block + 1, ...
    fault: str | None = None


@dataclass(frozen=True)
class SaveSpec:
    req_id: str
    tokens: tuple[int, ...]        #: the chunks to publish, all materialised (whole, then maybe a partial one)
    block_ids: tuple[int, ...]     #: the blocks holding them, from the request's first block


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
