"""Routes the client core's CUDA-tensor stores and loads to the GPU data path (``kvstore_client.gpu``).

``KVStoreClient.store`` / ``retrieve_into`` (and the async ones) with a CUDA tensor on the
same-host path run ``GpuRoute.store`` / ``retrieve_into`` as a ``Work`` step: pipelined
ReserveWrite / LeaseRead with copy-engine copies, GPU CRC32C, HBM-tier hits loaded
device-to-device. Each returns None when the GPU path cannot serve the call (no CUDA
library, an arena that cannot be registered with CUDA, a restarted daemon): the core then
takes its host-staged path, which also re-attaches after a restart.

Nothing here imports torch or CUDA code until a CUDA tensor arrives (the caller has torch
loaded by then). Threading: as ``GpuPath`` (one call at a time per client; calls serialise).
"""

from __future__ import annotations

from typing import Sequence

from kvstore_wire.types import Durability


class GpuRoute:
    def __init__(self, front) -> None:
        """``front``: the ``KVStoreClient`` or ``AsyncKVStoreClient`` owning the core."""
        self._front = front
        self._usable: bool | None = None

    def usable(self) -> bool:
        if self._usable is None:
            from kvstore_native import cuda_ipc
            self._usable = cuda_ipc.available()
        return self._usable

    def _gp(self):
        from .gpu_state import _path
        gp = _path(self._front)
        if gp.client.arena_changed:
            return None
        return gp

    @staticmethod
    def caller_stream(t):
        """The current CUDA stream of ``t``'s device on the calling thread (the plan's: under
        the async client the GPU work runs on a worker thread, ordered after this stream)."""
        import torch
        return torch.cuda.current_stream(t.device)

    def store(self, tokens: Sequence[int], kv, durability: Durability, stream=None, keys=None) -> int | None:
        """Chunks newly stored, or None (the core's other path serves the call)."""
        from .errors import ResourceExhausted
        from .gpu_state import ArenaChanged, GpuPathUnusable
        from .gpu_store import store_cuda

        if not self.usable() or self._gp() is None:
            return None
        try:
            return store_cuda(self._front, tokens, kv, durability, stream=stream, keys=keys)
        except (ArenaChanged, GpuPathUnusable):
            return None
        except ResourceExhausted:
            # The daemon refused even one chunk's reservation, or the commit (the tenant's
            # DRAM quota): the stream path queues on the in-flight budget and may land the
            # chunks in a lower tier, as for CPU tensors.
            return None

    def retrieve_into(self, tokens: Sequence[int], out, stream=None, keys=None) -> int | None:
        """Tokens placed into ``out``, or None (the core's other path serves the call). ``keys``:
        the prefix keys of ``tokens`` from the core (once per call; a ``PrefixKeys``, hashed as read)."""
        from .gpu_retrieve import retrieve_into_cuda
        from .gpu_state import GpuPathUnusable

        gp = self._gp() if self.usable() else None
        if gp is None:
            return None
        try:
            n = retrieve_into_cuda(self._front, tokens, out, stream=stream, keys=keys)
        except GpuPathUnusable:
            return None
        return None if gp.client.arena_changed else n

    def reattached(self) -> None:
        """The core re-attached (new arena): the session's offsets are valid again."""
        gp = getattr(self._front, "_gpu_path", None)
        if gp is not None:
            gp.client.arena_changed = False

    def close(self) -> None:
        gp = getattr(self._front, "_gpu_path", None)
        if gp is not None:
            gp.close()
            self._front._gpu_path = None
