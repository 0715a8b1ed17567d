"""CUDA tensors through the same-host path: GPU -> arena -> GPU, bit-exact (GPU machines only)."""

import pytest

from kvstore_client import KVStoreClient, Namespace

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_store_and_retrieve_into_are_bit_exact(daemon, dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ns = Namespace(model=f"gpu-local-{dtype}", dtype=dtype, num_layers=6, num_kv_heads=4, head_dim=64, chunk_tokens=64)
    tokens = list(range(64 * 5 + 7))
    kv = torch.randn(ns.chunk_shape(len(tokens)), device="cuda").to(getattr(torch, dtype))
    with KVStoreClient(daemon.addr, ns) as c:
        assert c.transport == "shm"
        assert c.store(tokens, kv) == 5
        out = torch.full(ns.chunk_shape(64 * 5), float("nan"), device="cuda", dtype=kv.dtype)
        assert c.retrieve_into(tokens[:320], out) == 320
        assert torch.equal(out, kv[:, :, :320])
        # The host path agrees byte for byte.
        n, host = c.retrieve(tokens, as_torch=True)
        assert n == 320 and torch.equal(host, kv[:, :, :320].cpu())
