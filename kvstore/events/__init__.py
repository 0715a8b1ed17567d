"""KV events for cache-aware routers: vLLM's KV-events format over ZMQ (docs/events.md)."""

from .format import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch
from .publisher import END_SEQ, SNAPSHOT_REQUEST, KVEventPublisher, PublisherStats, fan_out

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "encode_batch", "END_SEQ", "SNAPSHOT_REQUEST",
           "KVEventPublisher", "PublisherStats", "fan_out"]
