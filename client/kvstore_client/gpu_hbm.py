"""The engine side of the daemon's HBM tier (kvstore/tiers/hbm.py): the pool mapped once from its
CUDA IPC handle, device-to-device loads of leased extents into the engine's memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kvstore_native import cuda_ipc, transfer
from kvstore_native.transfer import PlaneSpec

from .errors import InvalidArgument
from .gpu_layout import _contiguous_rows


@dataclass
class HbmPoolMapping:
    """A client's mapping of the daemon's HBM pool: opened once from its IPC handle; chunks
    are ``(offset, length)`` extents inside it (leased by the daemon like arena extents)."""

    base: int
    size: int
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, handle: bytes, size: int) -> "HbmPoolMapping":
        return cls(cuda_ipc.ipc_open(handle), size)

    def load(self, offset: int, length: int, dst, ns=None, chunk: int = 0, stream: int = 0) -> None:
        """Device-to-device: the pool extent into ``dst`` (a ``PlaneSpec`` -> scatter kernel; a
        contiguous namespace-layout tensor -> one 2D copy of chunk ``chunk``; an int -> a flat copy)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"extent [{offset}, {offset + length}) lies outside the {self.size}-byte pool")
        src = self.base + offset
        if isinstance(dst, PlaneSpec):
            transfer.scatter(src, dst, device=True, stream=stream)
        elif isinstance(dst, int):
            cuda_ipc.memcpy_batch([dst], [src], [length], stream)
        else:
            base, pitch, row, planes = _contiguous_rows(dst, ns, chunk + 1)[chunk]
            cuda_ipc.memcpy2d(base, pitch, src, row, row, planes, stream)

    def load_many(self, extents: Sequence[tuple[int, int]], dst, ns, first_chunk: int = 0, stream: int = 0) -> None:
        """Device-to-device: pool extents ``[(offset, length), ...]`` into consecutive chunks of
        the contiguous namespace-layout tensor ``dst`` from ``first_chunk`` on, in one kernel launch."""
        rows = _contiguous_rows(dst, ns, first_chunk + len(extents))[first_chunk:]
        for off, n in extents:
            if off < 0 or off + n > self.size or n != ns.chunk_bytes():
                raise InvalidArgument(f"extent [{off}, {off + n}) is not a chunk inside the {self.size}-byte pool")
        _, pitch, row, planes = rows[0]
        cuda_ipc.copy_rows([r[0] for r in rows], [self.base + off for off, _ in extents], pitch, row, row, planes, stream)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            cuda_ipc.ipc_close(self.base)
