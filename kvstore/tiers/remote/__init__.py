"""The remote tier: KV bitstreams in a Redis Cluster shared by every replica (docs/remote.md).

``RemoteTier`` (a ``Tier``), ``RemoteUploader`` (write path), ``RemoteReader`` (read path),
``AdaptiveController`` and ``ThroughputMeter`` (codec level from the measured link).
``build_remote`` wires them from config for the chain.
"""

from .adaptive import AdaptiveController, Decision, ThroughputMeter, allowed_levels
from .reader import FetchedChunk, RemoteReader
from .tier import RemoteStats, RemoteTier, StoreOutcome
from .uploader import RemoteUploader, UploaderStats
from .wiring import RemoteParts, build_remote

__all__ = ["AdaptiveController", "Decision", "ThroughputMeter", "allowed_levels", "FetchedChunk",
           "RemoteReader", "RemoteStats", "RemoteTier", "StoreOutcome", "RemoteUploader", "UploaderStats",
           "RemoteParts", "build_remote"]
