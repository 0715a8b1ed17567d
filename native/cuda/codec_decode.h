// The batched GPU decoder of codec_decode.cu, as the host units of the CUDA codec call it.
#pragma once
#include <cuda_runtime.h>

#include "codec/format.h"

namespace kvc_cuda {

// Decoder variants (kvs_cuda_codec_set_decoder). kDecoderFirst is codec.cu's first decoder
// (one thread per lane, models in global memory, 128-thread blocks, one grid row per chunk);
// the others are k_decode_warp with the compact models in shared (Smem) or global memory and
// the portable or the hardware (Hw, cvt.rn) float -> fp16/bf16 conversion; both conversions
// round to nearest even and agree on every finite value (kvs_cuda_codec_selftest checks it).
enum DecoderVariant : int {
  kDecoderFirst = 0,
  kDecoderWarpSmem = 1,
  kDecoderWarpSmemHw = 2,
  kDecoderWarpGlobal = 3,
  kDecoderWarpGlobalHw = 4,
  kDecoderWarpSmemHwShort = 5,  // WarpSmemHw with a shorter symbol chain (codec_decode.cu, SHORT)
  kDecoderLast = kDecoderWarpSmemHwShort,
};
// The process's initial choice for kvs_cuda_codec_decode(_batch), and the batched decoder the
// pipelined load uses when the first decoder is selected (it has no chunk offset for groups).
// Bit-exact with the CPU on an H100 (bench/results/h100-gpu_codec_bench-2026-12-06-*.txt); the
// mapped load 2-9% faster than with kDecoderWarpSmemHw in the same runs (A B B A).
constexpr int kDecoderInitial = kDecoderWarpSmemHwShort;
constexpr int kDecoderDefault = kDecoderWarpSmemHwShort;

int decode_variant();
bool ensure_decode_models(kvc::Error& e);
// Warps (groups of 32 lanes) per segment that the batched decoders launch for chunks of at
// most `lanes` lanes and C channels.
uint32_t lane_groups(uint32_t lanes, uint32_t C);

// Warps of the mapped decode kernel resident at once on this device (its occupancy x SMs).
bool mapped_resident_warps(uint64_t* warps, kvc::Error& e);

// Enqueues the decode of `count` chunks of shape `h` on `st` (device arrays of pointers and
// lengths; derr: 4 device ints, zeroed by the caller). Asynchronous; errors land in derr.
bool enqueue_decode(int variant, const kvc::Header& h, uint32_t count, uint32_t chunk_base, const uint8_t* const* d_bufs,
                    const uint64_t* d_lens, void* const* d_dsts, int* derr, cudaStream_t st, kvc::Error& e);

// Where a mapped decode writes (device arrays, indexed by the chunk's place in the whole call):
// element (segment p = layer * S + k, token t, channel c) of chunk i goes to
//   planes[i * L * S + p] + toks[i * T + t] + (c / run_elems) * run_stride + (c % run_elems) * B.
// With `want` (and `got`, both of the call's length), chunk i decodes only when got[k] ==
// want[k] for every k <= i; a chunk gated out writes nothing and reports nothing.
struct DecodeMap {
  const uint64_t* planes;
  const uint64_t* toks;
  uint64_t run_stride;
  uint32_t run_elems;
  const uint32_t* got;
  const uint32_t* want;
};

// Enqueues the mapped decode of chunks chunk_base .. chunk_base + count of a call (d_bufs,
// d_lens: those chunks' entries). Each bitstream's header is checked on the device against `h`
// (kErrHeader otherwise); derr[3] receives the lowest failing chunk (the caller presets it high).
bool enqueue_decode_mapped(int variant, const kvc::Header& h, uint32_t count, uint32_t chunk_base,
                           const uint8_t* const* d_bufs, const uint64_t* d_lens, const DecodeMap& m, int* derr,
                           cudaStream_t st, kvc::Error& e);

}  // namespace kvc_cuda
