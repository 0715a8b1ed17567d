"""``kvs_scatter_stream`` (non-temporal stores) writes exactly what ``kvs_scatter`` writes,
aligned or not, and refuses bad arguments the same way."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore_native import transfer


@pytest.mark.parametrize("head_bytes,offset", [(256, 0), (24, 0), (256, 8)])
def test_streaming_scatter_is_byte_identical(head_bytes, offset):
    rng = np.random.default_rng(head_bytes + offset)
    planes, tokens, heads = 3, 40, 2
    chunk = rng.integers(0, 255, planes * tokens * heads * head_bytes, dtype=np.uint8)
    token_stride, head_stride = heads * head_bytes + 16, head_bytes
    slots = rng.permutation(64)[:tokens].tolist()
    outs = []
    for streaming in (False, True):
        mem = [np.zeros(64 * token_stride + offset + 64, np.uint8) for _ in range(planes)]
        spec = transfer.PlaneSpec([m.ctypes.data + offset for m in mem], slots, heads, head_bytes, token_stride,
                                  head_stride)
        transfer.scatter(chunk.ctypes.data, spec, device=False, streaming=streaming)
        outs.append(mem)
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    back = np.empty_like(chunk)
    transfer.gather(spec, back.ctypes.data, device=False)
    assert np.array_equal(back, chunk)


def test_streaming_scatter_refuses_bad_arguments():
    buf = np.zeros(64, np.uint8)
    with pytest.raises(transfer.TransferError, match="non-negative"):
        transfer.scatter(buf.ctypes.data, transfer.PlaneSpec([buf.ctypes.data], [-1], 1, 16, 16, 16), device=False,
                         streaming=True)
