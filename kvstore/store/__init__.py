"""The store facade: what the servicers call (typed methods and results, no tier reach-through)."""

from ..domain.results import KeyInfo, LookupResult, PutResult
from .local import ArenaInfo, LocalAccess, LocalRead
from .store import Store, StoreStats

__all__ = ["ArenaInfo", "KeyInfo", "LocalAccess", "LocalRead", "LookupResult", "PutResult", "Store", "StoreStats"]
