"""Enums mirrored from the wire contract (proto/kvstore/v1/common.proto).

The numeric values are the proto enum numbers and are also the codes docs/keys.md hashes,
so they never change.
"""

from __future__ import annotations

import enum


class DType(enum.IntEnum):
    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT32 = 3
    FLOAT8_E4M3 = 4

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @classmethod
    def parse(cls, value: "str | int | DType") -> "DType":
        """Accepts an enum, its number, or a name such as ``"float16"``, ``"bf16"``, ``"torch.bfloat16"``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        name = str(value).lower().removeprefix("torch.").removeprefix("numpy.")
        try:
            return _ALIASES[name]
        except KeyError:
            raise ValueError(f"unknown KV dtype {value!r}; use one of {sorted(_ALIASES)}") from None


_ITEMSIZE = {DType.FLOAT16: 2, DType.BFLOAT16: 2, DType.FLOAT32: 4, DType.FLOAT8_E4M3: 1}
_ALIASES = {
    "float16": DType.FLOAT16, "fp16": DType.FLOAT16, "half": DType.FLOAT16,
    "bfloat16": DType.BFLOAT16, "bf16": DType.BFLOAT16,
    "float32": DType.FLOAT32, "fp32": DType.FLOAT32, "float": DType.FLOAT32,
    "float8_e4m3fn": DType.FLOAT8_E4M3, "fp8": DType.FLOAT8_E4M3, "float8_e4m3": DType.FLOAT8_E4M3,
}


class Layout(enum.IntEnum):
    #: [layers, 2 (K, V), tokens, kv_heads, head_dim]
    LAYER_KV_TOKEN_HEAD_DIM = 1
    #: [layers, tokens, head_dim] (MLA latent; kv_heads must be 1)
    MLA_LATENT = 2


class Tier(enum.IntEnum):
    """Storage medium. ``NONE`` (0) means absent."""

    NONE = 0
    HBM = 1
    DRAM = 2
    DISK = 3
    REMOTE = 4


class Encoding(enum.IntEnum):
    RAW = 1
    CODEC = 2


class KeyKind(enum.IntEnum):
    PREFIX = 1
    CHUNK = 2


class Durability(enum.IntEnum):
    MEMORY = 1
    PERSISTED = 2
