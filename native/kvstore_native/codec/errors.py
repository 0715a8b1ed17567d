"""Codec exceptions."""


class CodecError(ValueError):
    """A bitstream is malformed, corrupt or hostile, or arguments do not fit the codec."""


class ChecksumError(CodecError):
    """A CRC32C in the bitstream does not match its bytes (corruption in storage or transit)."""
