"""Shapes and data used across the integration tests (kept here so tests import them from one place;
they live in :mod:`kvstore_testing.data` and :mod:`kvstore_testing.ports`, shared with the benchmarks)."""

from __future__ import annotations

from kvstore_testing.data import ADMIN_TOKEN, SMOL, TOKENS, kv_for, smol_ns, tokens_for
from kvstore_testing.ports import free_port

__all__ = ["ADMIN_TOKEN", "SMOL", "TOKENS", "free_port", "kv_for", "smol_ns", "tokens_for"]
