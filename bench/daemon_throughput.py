"""Store/retrieve throughput of real-sized KV chunks through the daemon, beside its ceilings.

Measured in the same run, on the same loopback, with the same bytes:
  * kvstore  - KVStoreClient.store / .retrieve (MEMORY durability; CRC32C computed and verified)
  * raw gRPC - grpcio (aio server on uvloop in another process) streaming the same chunk bytes
               in the same 1 MiB pieces with no framing beyond gRPC: the transport ceiling
  * Redis    - a real redis-server on loopback, redis-py SET/GET of one blob per chunk

    python bench/daemon_throughput.py [--repeats 5] [--chunks 8]

Shapes: SmolLM2-135M (30 layers, 3 KV heads, head dim 64, fp16) and Llama-3-8B (32 layers,
8 KV heads, head dim 128, bf16), 256-token chunks. Reported: median MB/s (1 MB = 1e6 bytes).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _raw_grpc import serve_raw_grpc  # noqa: E402

from kvstore_client import KVStoreClient, Namespace  # noqa: E402
from kvstore_testing.daemon import QUIET_SETTINGS, spawn_daemon  # noqa: E402
from kvstore_testing.ports import free_port  # noqa: E402

PIECE = 1024 * 1024
SHAPES = {
    "SmolLM2-135M": dict(dtype="float16", num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B": dict(dtype="bfloat16", num_layers=32, num_kv_heads=8, head_dim=128),
}


# ---------------------------------------------------------------- raw gRPC ceiling
def _raw_server(port: int, nbytes: int, ready) -> None:
    import grpc

    blob = os.urandom(nbytes)
    ident = lambda b: b  # noqa: E731

    async def download(request, context):
        mv = memoryview(blob)
        for off in range(0, nbytes, PIECE):
            yield bytes(mv[off:off + PIECE])

    async def upload(it, context):
        buf = bytearray(nbytes)
        pos = 0
        async for piece in it:
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        return b"ok"

    serve_raw_grpc(port, ready, "raw.Raw", {
        "Download": grpc.unary_stream_rpc_method_handler(download, ident, ident),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, ident, ident)},
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])


def bench_raw(nbytes: int, repeats: int) -> tuple[float, float]:
    import grpc

    port = free_port()
    ready = mp.Event()
    p = mp.Process(target=_raw_server, args=(port, nbytes, ready), daemon=True)
    p.start()
    ready.wait(30)
    ident = lambda b: b  # noqa: E731
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    up_t, down_t = [], []
    payload = memoryview(os.urandom(nbytes))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        down = ch.unary_stream("/raw.Raw/Download", ident, ident)
        up = ch.stream_unary("/raw.Raw/Upload", ident, ident)
        for _ in range(repeats + 1):
            t = time.perf_counter()
            up(bytes(payload[o:o + PIECE]) for o in range(0, nbytes, PIECE))
            up_t.append(time.perf_counter() - t)
            out = np.empty(nbytes, np.uint8)
            t = time.perf_counter()
            pos = 0
            for piece in down(b""):
                out[pos:pos + len(piece)] = np.frombuffer(piece, np.uint8)
                pos += len(piece)
            down_t.append(time.perf_counter() - t)
    p.kill()
    return nbytes / statistics.median(up_t[1:]) / 1e6, nbytes / statistics.median(down_t[1:]) / 1e6


# ---------------------------------------------------------------- Redis
def bench_redis(chunks: list[np.ndarray], repeats: int) -> tuple[float, float] | None:
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return None
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--protected-mode", "no"], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        total = sum(c.nbytes for c in chunks)
        up_t, down_t = [], []
        for rep in range(repeats + 1):
            t = time.perf_counter()
            for i, c in enumerate(chunks):
                r.set(f"{rep}:{i}", memoryview(c))
            up_t.append(time.perf_counter() - t)
            out = np.empty(total, np.uint8)
            t = time.perf_counter()
            pos = 0
            for i, c in enumerate(chunks):
                b = r.get(f"{rep}:{i}")
                out[pos:pos + len(b)] = np.frombuffer(b, np.uint8)
                pos += len(b)
            down_t.append(time.perf_counter() - t)
        return total / statistics.median(up_t[1:]) / 1e6, total / statistics.median(down_t[1:]) / 1e6
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- kvstore
def bench_kvstore(addr: str, name: str, shape: dict, n_chunks: int, repeats: int):
    ns = Namespace(model=f"bench/{name}", chunk_tokens=256, **shape)
    u16 = np.random.default_rng(0).integers(0, 1 << 16, size=ns.chunk_shape(256 * n_chunks), dtype=np.uint16)
    kv = u16 if ns.dtype.itemsize == 2 else u16.astype(np.float32)
    if ns.dtype.name == "FLOAT16":
        kv = u16.view(np.float16)
    up_t, down_t = [], []
    with KVStoreClient(addr, ns, local=False) as c:
        for rep in range(repeats + 1):
            toks = [rep * 1_000_000 + i for i in range(256 * n_chunks)]
            t = time.perf_counter()
            assert c.store(toks, kv) == n_chunks
            up_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            n, out = c.retrieve(toks)
            down_t.append(time.perf_counter() - t)
            assert n == 256 * n_chunks
            if rep == 0:
                assert np.array_equal(out.view(np.uint16), u16)
            c.delete(c.keys(toks))
    total = ns.chunk_bytes() * n_chunks
    chunks = [np.ascontiguousarray(kv[:, :, i * 256:(i + 1) * 256]).view(np.uint8).reshape(-1)
              for i in range(n_chunks)]
    return ns.chunk_bytes(), total, total / statistics.median(up_t[1:]) / 1e6, \
        total / statistics.median(down_t[1:]) / 1e6, chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=8, help="chunks per store/retrieve call")
    args = ap.parse_args()
    d = spawn_daemon(settings=[*QUIET_SETTINGS, "dram.capacity_bytes=2GiB", "disk.enabled=false", "server.worker_threads=4"])
    rows = []
    try:
        for name, shape in SHAPES.items():
            cb, total, st, rt, chunks = bench_kvstore(d.addr, name, shape, args.chunks, args.repeats)
            raw_up, raw_down = bench_raw(total, args.repeats)
            red = bench_redis(chunks, args.repeats)
            rows.append((name, cb, args.chunks, st, rt, raw_up, raw_down, red))
    finally:
        d.close()
    print(f"\nthroughput, MB/s (median of {args.repeats}; {os.cpu_count()} CPUs; "
          f"{args.chunks} chunks of 256 tokens per call)")
    hdr = f"{'shape':14} {'chunk MB':>8} | {'kvstore store':>13} {'raw gRPC up':>11} {'redis SET':>9} | " \
          f"{'kvstore retrieve':>16} {'raw gRPC down':>13} {'redis GET':>9} | {'retr/raw':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, cb, n, st, rt, ru, rd, red in rows:
        rs, rg = red if red else (float("nan"), float("nan"))
        print(f"{name:14} {cb / 1e6:8.2f} | {st:13.0f} {ru:11.0f} {rs:9.0f} | {rt:16.0f} {rd:13.0f} {rg:9.0f} | "
              f"{100 * rt / rd:7.0f}%")


if __name__ == "__main__":
    main()
