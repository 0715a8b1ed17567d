"""Test helpers shared by the suite and the benchmarks (real daemons, real models)."""
