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
};
// The process's initial choice for kvs_cuda_codec_decode(_batch), and the batched decoder the
// pipelined load uses when the first decoder is selected (it has no chunk offset for groups).
// Both bit-exact with the CPU on an H200 (bench/results/h200-gpu_codec_bench.txt).
constexpr int kDecoderInitial = kDecoderWarpSmemHw;
constexpr int kDecoderDefault = kDecoderWarpSmemHw;

int decode_variant();
bool ensure_decode_models(kvc::Error& e);

// Enqueues the decode of `count` chunks of shape `h` on `st` (device arrays of pointers and
// lengths; derr: 4 device ints, zeroed by the caller). Asynchronous; errors land in derr.
bool enqueue_decode(int variant, const kvc::Header& h, uint32_t count, uint32_t chunk_base, const uint8_t* const* d_bufs,
                    const uint64_t* d_lens, void* const* d_dsts, int* derr, cudaStream_t st, kvc::Error& e);

}  // namespace kvc_cuda
