"""kvstore: tiered KV-cache storage daemon."""
