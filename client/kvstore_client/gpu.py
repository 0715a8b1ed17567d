"""The client's GPU data path over the same-host arena: batched, pipelined store and retrieve
between engine CUDA memory and the daemon's DRAM arena, GPU-side CRC32C, GPU decode of
compressed chunks, and loads from the daemon's HBM tier through CUDA IPC.

Entry points the client core calls (they use the client's bound RPC stubs, arena mapping and
lease releaser; nothing here opens a channel):

- :func:`store_cuda(client, tokens, src)` -> chunks newly stored
- :func:`retrieve_into_cuda(client, tokens, dst)` -> tokens placed

``src`` / ``dst`` is either a CUDA tensor in the namespace layout ``[layers, 2, tokens, heads,
dim]`` (contiguous: moved by the copy engine with ``cudaMemcpy2DAsync``, no SM time) or a
:class:`Paged` source (a list of per-chunk ``PlaneSpec``; vLLM layouts via
``kvstore_native.transfer.paged_spec``): moved through a device staging ring, one gather or
scatter kernel per chunk on the device (HBM speed) and one copy-engine copy per chunk over
PCIe.

Pipelining: chunks go in groups; the ReserveWrite / LeaseRead of group g+1 is in flight while
group g's copies run, and group g's CommitWrite (carrying the GPU CRC32Cs, so the daemon need
not read the bytes) is sent from a helper thread once its copies completed. Registrations
(``cudaHostRegister`` of the arena) are made once per mapping and reused.

Lock order: none here; the state object's staging ring is used by one call at a time (a lock
serialises calls of one client).
"""

from __future__ import annotations

from .gpu_hbm import HbmPoolMapping
from .gpu_layout import Paged
from .gpu_retrieve import retrieve_into_cuda
from .gpu_state import DEFAULT_GROUP_CHUNKS, DEFAULT_STAGING_CHUNKS, GpuPath
from .gpu_store import store_cuda, store_encoded
from .gpu_layout import _contiguous_rows  # noqa: F401 (re-exported for the benchmarks)

__all__ = ["Paged", "GpuPath", "store_cuda", "retrieve_into_cuda", "store_encoded", "HbmPoolMapping",
           "DEFAULT_GROUP_CHUNKS", "DEFAULT_STAGING_CHUNKS"]
