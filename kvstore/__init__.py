"""kvstore: a tiered KV-cache storage and caching daemon for LLM inference."""

__version__ = "0.1.0"
