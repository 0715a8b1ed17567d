"""Test helpers: real-model KV for tests and benchmarks."""
