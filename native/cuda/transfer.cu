// CUDA paged-KV gather/scatter (see kvstore_transfer.h); bit-identical to the CPU reference
// because it only moves bytes.
//
// One thread moves one vector (16, 8, 4 or 1 bytes: the widest that every address and
// stride allows) of one (token, head) row; grid.y walks the planes. Consecutive threads
// cover consecutive bytes of the contiguous chunk side, so its accesses coalesce; on the
// engine side each head row is contiguous.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kvstore_transfer.h"

namespace {

constexpr int kThreads = 256;

template <typename V, bool kGather>
__global__ void move_kernel(const uint64_t* __restrict__ plane_ptrs, const int64_t* __restrict__ slots, int tokens,
                            int heads, int64_t vecs_per_head, int64_t token_stride, int64_t head_stride,
                            char* __restrict__ chunk) {
  const int p = blockIdx.y;
  const int64_t per_plane = static_cast<int64_t>(tokens) * heads * vecs_per_head;
  char* plane = reinterpret_cast<char*>(plane_ptrs[p]);
  V* chunk_plane = reinterpret_cast<V*>(chunk) + p * per_plane;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_plane;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = i % vecs_per_head;
    const int64_t row = i / vecs_per_head;
    const int h = static_cast<int>(row % heads);
    const int t = static_cast<int>(row / heads);
    V* eng = reinterpret_cast<V*>(plane + slots[t] * token_stride + h * head_stride) + v;
    if (kGather)
      chunk_plane[i] = *eng;
    else
      *eng = chunk_plane[i];
  }
}

int fail(char* err, size_t err_len, int code, const char* what, cudaError_t e = cudaSuccess) {
  if (err && err_len) {
    if (e != cudaSuccess)
      std::snprintf(err, err_len, "%s: %s", what, cudaGetErrorString(e));
    else
      std::snprintf(err, err_len, "%s", what);
  }
  return code;
}

template <bool kGather>
int launch(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads, int64_t head_bytes,
           int64_t token_stride, int64_t head_stride, void* chunk, void* stream_ptr, char* err, size_t err_len) {
  if (planes <= 0 || tokens < 0 || heads <= 0 || head_bytes <= 0 || planes > 65535)
    return fail(err, err_len, KVS_EINVAL, "planes (1..65535), heads and head_bytes must be positive");
  if (!plane_ptrs || !chunk || (tokens && !slots)) return fail(err, err_len, KVS_EINVAL, "null pointer argument");
  if (tokens == 0) return KVS_OK;
  for (int t = 0; t < tokens; ++t)
    if (slots[t] < 0) return fail(err, err_len, KVS_EINVAL, "slots must be non-negative");
  auto stream = static_cast<cudaStream_t>(stream_ptr);

  // Widest vector every address and stride is aligned to.
  uint64_t align_bits = static_cast<uint64_t>(head_bytes) | static_cast<uint64_t>(token_stride) |
                        static_cast<uint64_t>(head_stride) | reinterpret_cast<uint64_t>(chunk);
  for (int p = 0; p < planes; ++p) align_bits |= plane_ptrs[p];
  const int vec = (align_bits % 16 == 0) ? 16 : (align_bits % 8 == 0) ? 8 : (align_bits % 4 == 0) ? 4 : 1;

  // Arguments travel in one device buffer: plane pointers, then slots.
  const size_t arg_bytes = planes * sizeof(uint64_t) + tokens * sizeof(int64_t);
  std::vector<char> host(arg_bytes);
  std::memcpy(host.data(), plane_ptrs, planes * sizeof(uint64_t));
  std::memcpy(host.data() + planes * sizeof(uint64_t), slots, tokens * sizeof(int64_t));
  void* dev = nullptr;
  cudaError_t e = cudaMallocAsync(&dev, arg_bytes, stream);
  if (e != cudaSuccess) return fail(err, err_len, KVS_ECUDA, "cudaMallocAsync", e);
  e = cudaMemcpyAsync(dev, host.data(), arg_bytes, cudaMemcpyHostToDevice, stream);
  if (e != cudaSuccess) {
    cudaFreeAsync(dev, stream);
    return fail(err, err_len, KVS_ECUDA, "cudaMemcpyAsync (arguments)", e);
  }
  // `host` is pageable: cudaMemcpyAsync stages it before returning, so it may die at return.
  const auto* d_ptrs = static_cast<const uint64_t*>(dev);
  const auto* d_slots = reinterpret_cast<const int64_t*>(static_cast<char*>(dev) + planes * sizeof(uint64_t));

  const int64_t vecs = head_bytes / vec;
  const int64_t per_plane = static_cast<int64_t>(tokens) * heads * vecs;
  const int64_t blocks_x = std::min<int64_t>((per_plane + kThreads - 1) / kThreads, 4096);
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(planes));
  auto* c = static_cast<char*>(chunk);
  switch (vec) {
    case 16: move_kernel<uint4, kGather><<<grid, kThreads, 0, stream>>>(d_ptrs, d_slots, tokens, heads, vecs, token_stride, head_stride, c); break;
    case 8: move_kernel<uint2, kGather><<<grid, kThreads, 0, stream>>>(d_ptrs, d_slots, tokens, heads, vecs, token_stride, head_stride, c); break;
    case 4: move_kernel<uint32_t, kGather><<<grid, kThreads, 0, stream>>>(d_ptrs, d_slots, tokens, heads, vecs, token_stride, head_stride, c); break;
    default: move_kernel<uint8_t, kGather><<<grid, kThreads, 0, stream>>>(d_ptrs, d_slots, tokens, heads, vecs, token_stride, head_stride, c); break;
  }
  e = cudaGetLastError();
  cudaFreeAsync(dev, stream);
  if (e != cudaSuccess) return fail(err, err_len, KVS_ECUDA, "kernel launch", e);
  return KVS_OK;
}

}  // namespace

KVS_API int kvs_cuda_gather(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads,
                            int64_t head_bytes, int64_t token_stride, int64_t head_stride, void* chunk, void* stream,
                            char* err, size_t err_len) {
  return launch<true>(plane_ptrs, planes, slots, tokens, heads, head_bytes, token_stride, head_stride, chunk, stream,
                      err, err_len);
}

KVS_API int kvs_cuda_scatter(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                             int tokens, int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride,
                             void* stream, char* err, size_t err_len) {
  return launch<false>(plane_ptrs, planes, slots, tokens, heads, head_bytes, token_stride, head_stride,
                       const_cast<void*>(chunk), stream, err, err_len);
}
