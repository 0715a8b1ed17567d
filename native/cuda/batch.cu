// Batched GPU data-path primitives (kvstore.h, "CUDA batch copies, checksums, pools, IPC").
//
// CRC32C on the GPU, bit-exact with kvs_crc32c: CRC is linear over GF(2), so
//     crc(A || B) == (crc(A) * x^(8|B|) mod P) ^ crc(B)
// (zlib's crc32_combine, here with the Castagnoli polynomial). Every thread checksums one
// kPiece-byte piece with a byte table, a block folds its pieces into one segment CRC by a
// shared-memory tree, and a second kernel folds each buffer's segments. The shift operators
// x^(8n) mod P come from a table of x^(2^k) (computed on the host once).
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "crc_batch.h"
#include "error.h"
#include "kvstore.h"

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli
constexpr int kPieceBytes = 64;          // bytes per thread
constexpr int kSegThreads = 256;
constexpr int64_t kSegBytes = int64_t{kPieceBytes} * kSegThreads;  // bytes per block of the first kernel
constexpr int kFoldThreads = 1024;

struct CrcTables {
  uint32_t x2n[64];    // x^(2^k) mod P, reflected
  uint32_t byte[256];  // byte-at-a-time table
};

// a * b mod P in the reflected representation (bit 31 is x^0).
__host__ __device__ inline uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(8 * nbytes) mod P.
__host__ __device__ inline uint32_t shift_op(const uint32_t* x2n, uint64_t nbytes) {
  uint32_t p = 1u << 31;
  int k = 3;
  while (nbytes) {
    if (nbytes & 1) p = multmodp(x2n[k & 63], p);
    nbytes >>= 1;
    ++k;
  }
  return p;
}

const CrcTables& tables() {
  static CrcTables t;
  static std::once_flag once;
  std::call_once(once, [] {
    uint32_t p = 1u << 30;  // x^1
    t.x2n[0] = p;
    for (int n = 1; n < 64; ++n) t.x2n[n] = p = multmodp(p, p);
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t.byte[i] = c;
    }
  });
  return t;
}

struct CrcArgs {
  const uint64_t* ptrs;
  const uint64_t* lens;
  uint32_t* seg_crcs;  // [count, max_segs]
  uint32_t max_segs;
};

// grid (max_segs, count): block (s, c) checksums bytes [s*kSegBytes, (s+1)*kSegBytes) of buffer c.
__global__ void crc_segments(const __grid_constant__ CrcTables tab, CrcArgs a) {
  __shared__ uint32_t table[256];
  __shared__ uint32_t part[kSegThreads];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = tab.byte[i];
  __syncthreads();
  const int c = blockIdx.y;
  const uint64_t len = a.lens[c];
  const uint64_t seg0 = static_cast<uint64_t>(blockIdx.x) * kSegBytes;
  if (seg0 >= len) return;  // whole block leaves together: no barrier is skipped by a part
  const auto* base = reinterpret_cast<const uint8_t*>(a.ptrs[c]);
  const uint64_t start = seg0 + static_cast<uint64_t>(threadIdx.x) * kPieceBytes;
  uint32_t crc = 0;
  if (start < len) {
    const uint64_t n = (len - start < kPieceBytes) ? len - start : kPieceBytes;
    uint32_t r = 0xFFFFFFFFu;
    const uint8_t* p = base + start;
    if (n == kPieceBytes && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      uint4 v[kPieceBytes / 16];
#pragma unroll
      for (int i = 0; i < kPieceBytes / 16; ++i) v[i] = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
      for (int i = 0; i < kPieceBytes / 16; ++i) {
        const uint32_t w[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int b = 0; b < 4; ++b) r = table[(r ^ (w[j] >> (8 * b))) & 0xFF] ^ (r >> 8);
      }
    } else {
      for (uint64_t i = 0; i < n; ++i) r = table[(r ^ p[i]) & 0xFF] ^ (r >> 8);
    }
    crc = r ^ 0xFFFFFFFFu;
  }
  part[threadIdx.x] = crc;
  __syncthreads();
  for (int stride = 1; stride < kSegThreads; stride *= 2) {
    const int t = threadIdx.x;
    if (t % (2 * stride) == 0) {
      const uint64_t rs = seg0 + static_cast<uint64_t>(t + stride) * kPieceBytes;  // right part's start
      const uint64_t want = static_cast<uint64_t>(stride) * kPieceBytes;
      const uint64_t rlen = rs >= len ? 0 : (len - rs < want ? len - rs : want);
      if (rlen) part[t] = multmodp(shift_op(tab.x2n, rlen), part[t]) ^ part[t + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) a.seg_crcs[static_cast<uint64_t>(c) * a.max_segs + blockIdx.x] = part[0];
}

// One block per buffer: folds its segment CRCs into out[c].
__global__ void crc_fold(const __grid_constant__ CrcTables tab, CrcArgs a, uint32_t* out) {
  __shared__ uint32_t part[kFoldThreads];
  __shared__ uint64_t plen[kFoldThreads];
  const int c = blockIdx.x;
  const uint64_t len = a.lens[c];
  const uint64_t nseg = (len + kSegBytes - 1) / kSegBytes;
  const uint64_t per = (nseg + kFoldThreads - 1) / kFoldThreads;
  const uint32_t* segs = a.seg_crcs + static_cast<uint64_t>(c) * a.max_segs;
  const uint32_t full_op = shift_op(tab.x2n, kSegBytes);
  uint32_t crc = 0;
  uint64_t have = 0;  // bytes folded into crc
  for (uint64_t s = threadIdx.x * per; s < (threadIdx.x + 1) * per && s < nseg; ++s) {
    const uint64_t slen = (len - s * kSegBytes < kSegBytes) ? len - s * kSegBytes : kSegBytes;
    crc = (have ? multmodp(slen == kSegBytes ? full_op : shift_op(tab.x2n, slen), crc) : 0) ^ segs[s];
    have += slen;
  }
  part[threadIdx.x] = crc;
  plen[threadIdx.x] = have;
  __syncthreads();
  for (int stride = 1; stride < kFoldThreads; stride *= 2) {
    const int t = threadIdx.x;
    if (t % (2 * stride) == 0) {
      const uint64_t rlen = plen[t + stride];
      if (rlen) {
        part[t] = multmodp(shift_op(tab.x2n, rlen), part[t]) ^ part[t + stride];
        plen[t] += rlen;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[c] = len ? part[0] : 0;
}

int cuda_fail(char* err, size_t err_len, const char* what, cudaError_t e) {
  return kvs::fail(err, err_len, KVS_ECUDA, "%s: %s", what, cudaGetErrorString(e));
}

}  // namespace

namespace kvs_cuda {

uint64_t crc32c_scratch_words(uint64_t max_len) { return max_len ? (max_len + kSegBytes - 1) / kSegBytes : 1; }

cudaError_t crc32c_batch_device(uint32_t count, const uint64_t* d_ptrs, const uint64_t* d_lens, uint64_t max_len,
                                uint32_t* d_scratch, uint32_t* d_out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  CrcArgs a{d_ptrs, d_lens, d_scratch, static_cast<uint32_t>(crc32c_scratch_words(max_len))};
  const CrcTables& tab = tables();
  if (max_len) crc_segments<<<dim3(a.max_segs, count), kSegThreads, 0, stream>>>(tab, a);
  crc_fold<<<count, kFoldThreads, 0, stream>>>(tab, a, d_out);
  return cudaGetLastError();
}

}  // namespace kvs_cuda

KVS_API int kvs_cuda_crc32c_batch(uint32_t count, const uint64_t* ptrs, const uint64_t* lens, uint32_t* out,
                                  void* stream_ptr, char* err, size_t err_len) {
  if (count == 0) return KVS_OK;
  if (!ptrs || !lens || !out) return kvs::fail(err, err_len, KVS_EINVAL, "null pointer argument");
  if (count > 65535) return kvs::fail(err, err_len, KVS_EINVAL, "at most 65535 buffers per call (got %u)", count);
  uint64_t max_len = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (lens[i] && !ptrs[i]) return kvs::fail(err, err_len, KVS_EINVAL, "buffer %u is null", i);
    max_len = lens[i] > max_len ? lens[i] : max_len;
  }
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const uint64_t max_segs = max_len ? (max_len + kSegBytes - 1) / kSegBytes : 1;
  if (max_segs > 0x7FFFFFFFull) return kvs::fail(err, err_len, KVS_EINVAL, "buffer too large");
  const size_t arg_bytes = 2 * count * sizeof(uint64_t);
  const size_t seg_bytes = count * max_segs * sizeof(uint32_t);
  std::vector<uint64_t> host(2 * count);
  std::memcpy(host.data(), ptrs, count * sizeof(uint64_t));
  std::memcpy(host.data() + count, lens, count * sizeof(uint64_t));
  void* dev = nullptr;
  cudaError_t e = cudaMallocAsync(&dev, arg_bytes + seg_bytes, stream);
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaMallocAsync", e);
  // `host` is pageable: the copy is staged before the call returns.
  e = cudaMemcpyAsync(dev, host.data(), arg_bytes, cudaMemcpyHostToDevice, stream);
  if (e == cudaSuccess) {
    CrcArgs a{static_cast<const uint64_t*>(dev), static_cast<const uint64_t*>(dev) + count,
              reinterpret_cast<uint32_t*>(static_cast<char*>(dev) + arg_bytes), static_cast<uint32_t>(max_segs)};
    const CrcTables& tab = tables();
    if (max_len) crc_segments<<<dim3(static_cast<unsigned>(max_segs), count), kSegThreads, 0, stream>>>(tab, a);
    crc_fold<<<count, kFoldThreads, 0, stream>>>(tab, a, out);
    e = cudaGetLastError();
  }
  cudaFreeAsync(dev, stream);
  if (e != cudaSuccess) return cuda_fail(err, err_len, "crc32c kernels", e);
  return KVS_OK;
}

KVS_API uint32_t kvs_cuda_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
  return multmodp(shift_op(tables().x2n, len2), crc1) ^ crc2;
}

KVS_API int kvs_cuda_memcpy_batch(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                                  void* stream_ptr, char* err, size_t err_len) {
  if (count && (!dsts || !srcs || !sizes)) return kvs::fail(err, err_len, KVS_EINVAL, "null pointer argument");
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  for (uint32_t i = 0; i < count; ++i) {
    if (!sizes[i]) continue;
    cudaError_t e = cudaMemcpyAsync(reinterpret_cast<void*>(dsts[i]), reinterpret_cast<const void*>(srcs[i]),
                                    sizes[i], cudaMemcpyDefault, stream);
    if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaMemcpyAsync", e);
  }
  return KVS_OK;
}

KVS_API int kvs_cuda_memcpy2d(uint64_t dst, uint64_t dst_pitch, uint64_t src, uint64_t src_pitch, uint64_t width,
                              uint64_t height, void* stream_ptr, char* err, size_t err_len) {
  if (!width || !height) return KVS_OK;
  if (!dst || !src) return kvs::fail(err, err_len, KVS_EINVAL, "null pointer argument");
  cudaError_t e = cudaMemcpy2DAsync(reinterpret_cast<void*>(dst), dst_pitch, reinterpret_cast<const void*>(src),
                                    src_pitch, width, height, cudaMemcpyDefault, static_cast<cudaStream_t>(stream_ptr));
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaMemcpy2DAsync", e);
  return KVS_OK;
}

KVS_API int kvs_cuda_stream_sync(void* stream_ptr, char* err, size_t err_len) {
  cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream_ptr));
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaStreamSynchronize", e);
  return KVS_OK;
}

KVS_API int kvs_cuda_device_count(int* count, char* err, size_t err_len) {
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    *count = 0;
    return cuda_fail(err, err_len, "cudaGetDeviceCount", e);
  }
  return KVS_OK;
}

KVS_API int kvs_cuda_set_device(int device, char* err, size_t err_len) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaSetDevice", e);
  return KVS_OK;
}

KVS_API int kvs_cuda_host_register(uint64_t ptr, uint64_t bytes, char* err, size_t err_len) {
  cudaError_t e = cudaHostRegister(reinterpret_cast<void*>(ptr), bytes, cudaHostRegisterPortable);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
    return KVS_OK;
  }
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaHostRegister", e);
  return KVS_OK;
}

KVS_API int kvs_cuda_host_unregister(uint64_t ptr, char* err, size_t err_len) {
  cudaError_t e = cudaHostUnregister(reinterpret_cast<void*>(ptr));
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaHostUnregister", e);
  return KVS_OK;
}

KVS_API int kvs_cuda_malloc(uint64_t bytes, uint64_t* ptr, char* err, size_t err_len) {
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_fail(err, err_len, "cudaMalloc", e);
  }
  *ptr = reinterpret_cast<uint64_t>(p);
  return KVS_OK;
}

KVS_API int kvs_cuda_free(uint64_t ptr, char* err, size_t err_len) {
  cudaError_t e = cudaFree(reinterpret_cast<void*>(ptr));
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaFree", e);
  return KVS_OK;
}

KVS_API int kvs_cuda_ipc_get_handle(uint64_t ptr, uint8_t* handle, char* err, size_t err_len) {
  static_assert(sizeof(cudaIpcMemHandle_t) == KVS_CUDA_IPC_HANDLE_BYTES, "IPC handle size");
  cudaIpcMemHandle_t h;
  cudaError_t e = cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(ptr));
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaIpcGetMemHandle", e);
  std::memcpy(handle, &h, sizeof h);
  return KVS_OK;
}

KVS_API int kvs_cuda_ipc_open(const uint8_t* handle, uint64_t* ptr, char* err, size_t err_len) {
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle, sizeof h);
  void* p = nullptr;
  cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_fail(err, err_len, "cudaIpcOpenMemHandle", e);
  }
  *ptr = reinterpret_cast<uint64_t>(p);
  return KVS_OK;
}

KVS_API int kvs_cuda_ipc_close(uint64_t ptr, char* err, size_t err_len) {
  cudaError_t e = cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr));
  if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaIpcCloseMemHandle", e);
  return KVS_OK;
}

KVS_API void kvs_cuda_crc32c_fold(const uint32_t* crcs, uint64_t per_group, uint64_t len_each, uint64_t groups,
                             uint32_t* out) {
  const uint32_t op = shift_op(tables().x2n, len_each);
  for (uint64_t g = 0; g < groups; ++g) {
    const uint32_t* c = crcs + g * per_group;
    uint32_t acc = per_group ? c[0] : 0;
    for (uint64_t i = 1; i < per_group; ++i) acc = multmodp(op, acc) ^ c[i];
    out[g] = acc;
  }
}

// ---- proven prefixes on the device (kvs_cuda_prove_prefix) ----------------------------------
namespace {

constexpr uint32_t kProveMax = 128;  // expected CRCs per launch, in the kernel's parameter space

struct ProveArgs {
  uint32_t want[kProveMax];
};

// One thread: extends *gate past the leading matches only when every chunk before `first` is
// proven (*gate == first), so a mismatch ends the prefix for every later launch too.
__global__ void prove_prefix_kernel(const __grid_constant__ ProveArgs a, uint32_t count, const uint32_t* got,
                                    int32_t* gate, int32_t first) {
  if (threadIdx.x != 0 || *gate != first) return;
  uint32_t j = 0;
  while (j < count && got[j] == a.want[j]) ++j;
  *gate = first + static_cast<int32_t>(j);
}

}  // namespace

KVS_API int kvs_cuda_prove_prefix(uint32_t count, const uint32_t* got, const uint32_t* want, int32_t* gate,
                                  int32_t first, void* stream_ptr, char* err, size_t err_len) {
  if (count == 0) return KVS_OK;
  if (!got || !want || !gate) return kvs::fail(err, err_len, KVS_EINVAL, "null pointer argument");
  if (first < 0 || static_cast<uint64_t>(first) + count > 0x7FFFFFFFull)
    return kvs::fail(err, err_len, KVS_EINVAL, "first (%d) + count (%u) must fit in 0..2^31-1", first, count);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  for (uint32_t lo = 0; lo < count; lo += kProveMax) {
    const uint32_t n = count - lo < kProveMax ? count - lo : kProveMax;
    ProveArgs a;
    std::memcpy(a.want, want + lo, n * sizeof(uint32_t));
    prove_prefix_kernel<<<1, 32, 0, stream>>>(a, n, got + lo, gate, first + static_cast<int32_t>(lo));
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_fail(err, err_len, "prove_prefix", e);
  }
  return KVS_OK;
}
