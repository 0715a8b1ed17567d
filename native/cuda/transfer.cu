// CUDA paged-KV gather/scatter (kvstore.h, "paged-KV gather/scatter"); bit-identical to the CPU reference
// because it only moves bytes.
//
// One thread moves one vector (16, 8, 4 or 1 bytes: the widest that every address and
// stride allows) of one (token, head) row; grid.y walks the planes. Consecutive threads
// cover consecutive bytes of the contiguous chunk side, so its accesses coalesce; on the
// engine side each head row is contiguous.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "error.h"
#include "kvstore.h"

namespace {

constexpr int kThreads = 256;

// Fast path: all arguments travel in the kernel's parameter space.
constexpr int kMaxParamPlanes = 128;
constexpr int kMaxParamBlocks = 256;

struct ParamArgs {
  uint64_t plane_ptrs[kMaxParamPlanes];
  int64_t block_start[kMaxParamBlocks];
  int block;
};

// Where token t's slot is: from blocks of consecutive slots described in parameter space
// (no allocation, no upload: contiguous ranges for transformers, one block per paged block
// for vLLM) ...
struct BlockSlots {
  const uint64_t* plane_ptrs;
  const int64_t* block_start;
  int block;
  __device__ int64_t operator()(int t) const { return block_start[t / block] + t % block; }
};

// ... or from one slot per token in a device buffer (arbitrary slots).
struct ListSlots {
  const uint64_t* plane_ptrs;
  const int64_t* slots;
  __device__ int64_t operator()(int t) const { return slots[t]; }
};

// A gated launch (kvs_cuda_scatter_gated) moves nothing unless gate_index < *gate.
template <typename V, bool kGather, typename Slots>
__device__ void move(const Slots& where, int tokens, int heads, int64_t vecs_per_head, int64_t token_stride,
                     int64_t head_stride, char* __restrict__ chunk, const int32_t* gate, int32_t gate_index) {
  if (gate && gate_index >= *gate) return;
  const int p = blockIdx.y;
  const int64_t per_plane = static_cast<int64_t>(tokens) * heads * vecs_per_head;
  char* plane = reinterpret_cast<char*>(where.plane_ptrs[p]);
  V* chunk_plane = reinterpret_cast<V*>(chunk) + p * per_plane;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_plane;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = i % vecs_per_head;
    const int64_t row = i / vecs_per_head;
    const int h = static_cast<int>(row % heads);
    const int t = static_cast<int>(row / heads);
    V* eng = reinterpret_cast<V*>(plane + where(t) * token_stride + h * head_stride) + v;
    if (kGather)
      chunk_plane[i] = *eng;
    else
      *eng = chunk_plane[i];
  }
}

template <typename V, bool kGather>
__global__ void move_kernel_params(const __grid_constant__ ParamArgs args, int tokens, int heads, int64_t vecs_per_head,
                                   int64_t token_stride, int64_t head_stride, char* __restrict__ chunk,
                                   const int32_t* gate, int32_t gate_index) {
  move<V, kGather>(BlockSlots{args.plane_ptrs, args.block_start, args.block}, tokens, heads, vecs_per_head,
                   token_stride, head_stride, chunk, gate, gate_index);
}

template <typename V, bool kGather>
__global__ void move_kernel(const uint64_t* __restrict__ plane_ptrs, const int64_t* __restrict__ slots, int tokens,
                            int heads, int64_t vecs_per_head, int64_t token_stride, int64_t head_stride,
                            char* __restrict__ chunk, const int32_t* gate, int32_t gate_index) {
  move<V, kGather>(ListSlots{plane_ptrs, slots}, tokens, heads, vecs_per_head, token_stride, head_stride, chunk, gate,
                   gate_index);
}

// Largest block size b such that every run of b tokens has consecutive slots: the gcd of
// the positions where the slots stop being consecutive (tokens when they never do).
int uniform_block(const int64_t* slots, int tokens) {
  int g = 0;
  for (int t = 1; t < tokens; ++t)
    if (slots[t] != slots[t - 1] + 1) {
      int a = g, b = t;
      while (b) {
        int r = a % b;
        a = b;
        b = r;
      }
      g = a;
    }
  return g == 0 ? tokens : g;
}

int fail(char* err, size_t err_len, int code, const char* what, cudaError_t e = cudaSuccess) {
  if (e != cudaSuccess) return kvs::fail(err, err_len, code, "%s: %s", what, cudaGetErrorString(e));
  return kvs::fail(err, err_len, code, "%s", what);
}

template <bool kGather>
int launch(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads, int64_t head_bytes,
           int64_t token_stride, int64_t head_stride, void* chunk, void* stream_ptr, char* err, size_t err_len,
           const int32_t* gate = nullptr, int32_t gate_index = 0) {
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

  const int64_t vecs = head_bytes / vec;
  const int64_t per_plane = static_cast<int64_t>(tokens) * heads * vecs;
  const int64_t blocks_x = std::min<int64_t>((per_plane + kThreads - 1) / kThreads, 4096);
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(planes));
  auto* c = static_cast<char*>(chunk);
  cudaError_t e;
  void* dev = nullptr;

  const int block = uniform_block(slots, tokens);
  const int nblocks = (tokens + block - 1) / block;
  if (planes <= kMaxParamPlanes && nblocks <= kMaxParamBlocks) {
    ParamArgs a;
    std::memcpy(a.plane_ptrs, plane_ptrs, planes * sizeof(uint64_t));
    for (int b = 0; b < nblocks; ++b) a.block_start[b] = slots[b * block];
    a.block = block;
#define KVS_LAUNCH_P(V) move_kernel_params<V, kGather><<<grid, kThreads, 0, stream>>>(a, tokens, heads, vecs, token_stride, head_stride, c, gate, gate_index)
    switch (vec) {
      case 16: KVS_LAUNCH_P(uint4); break;
      case 8: KVS_LAUNCH_P(uint2); break;
      case 4: KVS_LAUNCH_P(uint32_t); break;
      default: KVS_LAUNCH_P(uint8_t); break;
    }
#undef KVS_LAUNCH_P
  } else {
    // Arguments travel in one device buffer: plane pointers, then slots.
    const size_t arg_bytes = planes * sizeof(uint64_t) + tokens * sizeof(int64_t);
    std::vector<char> host(arg_bytes);
    std::memcpy(host.data(), plane_ptrs, planes * sizeof(uint64_t));
    std::memcpy(host.data() + planes * sizeof(uint64_t), slots, tokens * sizeof(int64_t));
    e = cudaMallocAsync(&dev, arg_bytes, stream);
    if (e != cudaSuccess) return fail(err, err_len, KVS_ECUDA, "cudaMallocAsync", e);
    // `host` is pageable: cudaMemcpyAsync stages it before returning, so it may die at return.
    e = cudaMemcpyAsync(dev, host.data(), arg_bytes, cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) {
      cudaFreeAsync(dev, stream);
      return fail(err, err_len, KVS_ECUDA, "cudaMemcpyAsync (arguments)", e);
    }
    const auto* d_ptrs = static_cast<const uint64_t*>(dev);
    const auto* d_slots = reinterpret_cast<const int64_t*>(static_cast<char*>(dev) + planes * sizeof(uint64_t));
#define KVS_LAUNCH(V) move_kernel<V, kGather><<<grid, kThreads, 0, stream>>>(d_ptrs, d_slots, tokens, heads, vecs, token_stride, head_stride, c, gate, gate_index)
    switch (vec) {
      case 16: KVS_LAUNCH(uint4); break;
      case 8: KVS_LAUNCH(uint2); break;
      case 4: KVS_LAUNCH(uint32_t); break;
      default: KVS_LAUNCH(uint8_t); break;
    }
#undef KVS_LAUNCH
  }
  e = cudaGetLastError();
  if (dev) cudaFreeAsync(dev, stream);
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

KVS_API int kvs_cuda_scatter_gated(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                                   int tokens, int heads, int64_t head_bytes, int64_t token_stride,
                                   int64_t head_stride, const int32_t* gate, int32_t gate_index, void* stream,
                                   char* err, size_t err_len) {
  if (!gate) return fail(err, err_len, KVS_EINVAL, "null gate");
  return launch<false>(plane_ptrs, planes, slots, tokens, heads, head_bytes, token_stride, head_stride,
                       const_cast<void*>(chunk), stream, err, err_len, gate, gate_index);
}
