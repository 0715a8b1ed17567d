"""The same-host data path, client side: the daemon's DRAM arena mapped into this process.

``SharedArena.attach`` asks the daemon where its arena is, maps that file and checks the
nonce the daemon wrote into it. A match proves both processes see the same memory (same
host, same mount namespace); anything else (another host, no permission, a different
``/dev/shm``) returns None and the client keeps using the streamed gRPC path.

Bytes move with plain memory copies between the mapping and the caller's buffers; where a
CUDA device and torch are present, ``register_cuda`` page-locks the mapping
(``cudaHostRegister``) so host<->device copies from and to it run at pinned-memory speed.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class SharedArena:
    """A mapping of the daemon's arena. Thread-safe for disjoint extents (leases make them so)."""

    def __init__(self, path: str, size: int, mm: mmap.mmap) -> None:
        self.path = path
        self.size = size
        self._mm = mm
        self._array = np.frombuffer(mm, dtype=np.uint8)
        self.cuda_registered = False

    @classmethod
    def open(cls, path: str, size: int, nonce: bytes, nonce_offset: int) -> "SharedArena | None":
        """Maps ``path`` and verifies the nonce; None when this process cannot see the arena."""
        if not path or size <= 0 or not nonce:
            return None
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            log.info("shared arena %s not reachable (%s); using the gRPC stream path", path, e)
            return None
        try:
            if os.fstat(fd).st_size < size:
                return None
            # MAP_POPULATE faults the whole arena in now, once, instead of page by page in
            # the middle of transfers.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            log.info("cannot map shared arena %s (%s); using the gRPC stream path", path, e)
            return None
        finally:
            os.close(fd)
        if mm[nonce_offset:nonce_offset + len(nonce)] != nonce:
            mm.close()
            log.info("shared arena %s is not this daemon's (nonce differs); using the gRPC stream path", path)
            return None
        return cls(path, size, mm)

    def view(self, offset: int, length: int) -> np.ndarray:
        """uint8 array over ``[offset, offset+length)`` of the arena (no copy)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"extent [{offset}, {offset + length}) lies outside the {self.size}-byte arena")
        array = self._array          # close() swaps it for an empty one; read it once
        if array.size < self.size:
            raise ValueError(f"shared arena {self.path} was unmapped (the daemon restarted); lease again")
        return array[offset:offset + length]

    def register_cuda(self) -> bool:
        """Page-locks the mapping for CUDA (best effort); True when registered."""
        if self.cuda_registered:
            return True
        try:
            import torch

            if not torch.cuda.is_available():
                return False
            ptr = self._array.ctypes.data
            rc = torch.cuda.cudart().cudaHostRegister(ptr, self.size, 0)
            code = int(rc) if not isinstance(rc, tuple) else int(rc[0])
            if code != 0:
                log.warning("cudaHostRegister of the shared arena failed (error %d); GPU copies run unpinned", code)
                return False
            self.cuda_registered = True
            return True
        except Exception as e:  # noqa: BLE001 - pinning is an optimisation; report and go on
            log.warning("could not pin the shared arena for CUDA: %s", e)
            return False

    def close(self) -> None:
        if self.cuda_registered:
            try:
                import torch

                torch.cuda.cudart().cudaHostUnregister(self._array.ctypes.data)
            except Exception as e:  # noqa: BLE001
                log.warning("cudaHostUnregister failed: %s", e)
            self.cuda_registered = False
        self._array = np.empty(0, np.uint8)
        try:
            self._mm.close()
        except BufferError:
            # A caller still holds a view; the mapping is released when it is collected.
            pass

    def __enter__(self) -> "SharedArena":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
