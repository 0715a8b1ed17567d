"""Exceptions of the native bindings: one hierarchy, mapped from the C error codes once
(``kvstore_native._lib.check``)."""

from __future__ import annotations


class NativeError(Exception):
    """A native call failed; ``code`` is its negative ``KVS_E*`` status (include/kvstore.h)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class NativeLibraryMissing(ImportError):
    """A native library is not built, not loadable, or of another ABI version."""


class CodecError(NativeError, ValueError):
    """A bitstream is malformed, corrupt or hostile, or arguments do not fit the codec."""


class ChecksumError(CodecError):
    """A CRC32C in the bitstream does not match its bytes (corruption in storage or transit)."""


class TransferError(NativeError, RuntimeError):
    """A paged-KV gather/scatter was refused (bad description) or the CUDA runtime failed."""
