"""CPU <-> GPU bit-exactness of the lossy levels (needs a CUDA device and libkvstore_cuda.so)."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore_native.codec as kc
from kvstore_testing.codec_data import synthetic_kv

pytestmark = pytest.mark.gpu
LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from kvstore_native.codec import gpu

    try:
        gpu.lib()
    except ImportError as e:
        pytest.skip(str(e))
    return torch


@pytest.mark.parametrize("level", LOSSY)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_encode_decode_bit_exact(torch_cuda, level, dtype):
    from kvstore_native.codec import gpu

    torch = torch_cuda
    x = synthetic_kv(6, 256, 3, 64, dtype=dtype)
    x[0, :, 0] *= 0.01  # an attention-sink-like token
    dev = torch.from_numpy(x).cuda()
    cpu_bytes = kc.encode(x, level)
    assert gpu.encode(dev, level) == cpu_bytes
    out = torch.empty_like(dev)
    gpu.decode_into(cpu_bytes, out)
    assert out.cpu().numpy().tobytes() == kc.decode(cpu_bytes).tobytes()


def test_gpu_rejects_corrupt(torch_cuda):
    from kvstore_native.codec import gpu

    torch = torch_cuda
    x = synthetic_kv(2, 64, 3, 64)
    b = kc.encode(x, kc.CodecLevel.DEFAULT)
    out = torch.empty(x.shape, dtype=torch.float16, device="cuda")
    with pytest.raises(kc.CodecError):
        gpu.decode_into(b[:-5], out)
    with pytest.raises(kc.CodecError):
        gpu.decode_into(kc.encode(x, kc.CodecLevel.LOSSLESS), out)


def test_gpu_batch_decode(torch_cuda):
    from kvstore_native.codec import gpu

    torch = torch_cuda
    xs = [synthetic_kv(4, 256, 3, 64, seed=s) for s in range(5)]
    bs = [kc.encode(x, kc.CodecLevel.DEFAULT) for x in xs]
    outs = [torch.empty(x.shape, dtype=torch.float16, device="cuda") for x in xs]
    gpu.decode_batch(bs, outs)
    for b, o in zip(bs, outs):
        assert o.cpu().numpy().tobytes() == kc.decode(b).tobytes()
