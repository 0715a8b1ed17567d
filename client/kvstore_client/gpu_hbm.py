"""The engine side of the daemon's HBM tier (kvstore/tiers/hbm.py): the pool mapped once from its
CUDA IPC handle, device-to-device loads of leased extents into the engine's memory."""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kvstore_native import cuda_ipc, transfer
from kvstore_native.transfer import PlaneSpec

from .errors import InvalidArgument
from .gpu_layout import _contiguous_rows

log = logging.getLogger(__name__)


@dataclass
class HbmPoolMapping:
    """A client's mapping of the daemon's HBM pool: opened once from its IPC handle; chunks
    are ``(offset, length)`` extents inside it (leased by the daemon like arena extents)."""

    base: int
    size: int
    #: The pool's generation counters (``HbmPool.generations_path``), mapped read-only, and
    #: the pool bytes each one covers; None / 0 without them.
    gens: Any = None
    block_bytes: int = 0
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, handle: bytes, size: int, generations_path: str = "", block_bytes: int = 0) -> "HbmPoolMapping":
        gens = _map_generations(generations_path, size, block_bytes)
        return cls(cuda_ipc.ipc_open(handle), size, gens, block_bytes if gens is not None else 0)

    def blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The generation blocks ``[lo, hi)`` that pool bytes ``[offset, offset + length)`` lie in."""
        b = self.block_bytes
        return offset // b, (offset + max(length, 1) - 1) // b + 1

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
            self.gens = None
            cuda_ipc.ipc_close(self.base)


def _map_generations(path: str, pool_bytes: int, block_bytes: int):
    """The daemon's generation counters as a read-only u64 array, or None (no file, or one
    that does not cover the pool: loads from the pool then all take a lease)."""
    if not path or block_bytes <= 0:
        return None
    need = 8 * -(-pool_bytes // block_bytes)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < need:
                raise OSError(f"{path} holds fewer counters than the pool needs")
            mm = mmap.mmap(fd, need, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
    except OSError as e:
        log.info("the HBM pool's generation counters are not usable (%s); loads from it take leases", e)
        return None
    return np.frombuffer(mm, dtype=np.uint64)
