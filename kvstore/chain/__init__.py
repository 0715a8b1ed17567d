"""The tier chain: tiers composed fastest first, with write and promotion policies per link."""

from .build import build_chain
from .chain import ChainStats, Level, TierChain

__all__ = ["build_chain", "ChainStats", "Level", "TierChain"]
