"""Storage tiers (one module per medium), the wrappers around a tier (codec, faults), the
shared-memory protocol and the registry the chain is built from (``kvstore.chain``)."""
