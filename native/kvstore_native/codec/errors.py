"""Codec exceptions (defined with the other native errors in ``kvstore_native.errors``)."""

from kvstore_native.errors import ChecksumError, CodecError

__all__ = ["ChecksumError", "CodecError"]
