// The GPU CRC32C of batch.cu for callers inside the CUDA library whose argument arrays are
// already on the device (no allocation, no host copy: the launches only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace kvs_cuda {

// Scratch words (uint32) per buffer that crc32c_batch_device needs for buffers of at most
// max_len bytes.
uint64_t crc32c_scratch_words(uint64_t max_len);

// d_out[i] = kvs_crc32c(0, d_ptrs[i], d_lens[i]) for i < count (device arrays; every buffer at
// most max_len bytes, device memory or host memory the device can address); d_scratch holds
// count * crc32c_scratch_words(max_len) words. Asynchronous on `stream`.
cudaError_t crc32c_batch_device(uint32_t count, const uint64_t* d_ptrs, const uint64_t* d_lens, uint64_t max_len,
                                uint32_t* d_scratch, uint32_t* d_out, cudaStream_t stream);

}  // namespace kvs_cuda
