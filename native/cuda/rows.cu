// SM copy of a batch of 2D row blocks (kvstore.h, "kvs_cuda_copy_rows"): device-to-device moves
// between a chunk ([planes, row]) and its place in an engine tensor (rows `pitch` apart), e.g.
// HBM-tier loads and decoded chunks into the engine layout. Pure byte moves, 16-byte vectors,
// four loads in flight per thread; one launch for the whole batch.
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "error.h"
#include "kvstore.h"

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 8;
constexpr int kParamJobs = 128;  // jobs passed in the kernel's parameter space (no upload)

struct Job {
  uint64_t dst, src;
};

struct ParamJobs {
  Job job[kParamJobs];
};

// grid (x: vector blocks of a row, y: row of all jobs' rows). Row r belongs to job r / height.
// kThreads / kUnroll / kStream (streaming cache hints) are parameters for
// bench/cuda/copy_variants.cu, which times other choices against the landed <256, 8, false>.
// Gated launches (kvs_cuda_copy_rows_gated) skip job i unless first + i < *gate.
template <int Threads = kThreads, int Unroll = kUnroll, bool Stream = false, typename Jobs>
__device__ void copy_rows(const Jobs& jobs, uint64_t dst_pitch, uint64_t src_pitch, uint64_t vecs, uint64_t height,
                          uint64_t rows, const int32_t* gate = nullptr, int64_t first = 0) {
  const int64_t open = gate ? static_cast<int64_t>(*gate) - first : INT64_MAX;  // jobs below this may copy
  for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    if (static_cast<int64_t>(r / height) >= open) break;  // rows are in job order
    const Job j = jobs[r / height];
    const uint64_t row = r % height;
    const uint4* s = reinterpret_cast<const uint4*>(j.src + row * src_pitch);
    uint4* d = reinterpret_cast<uint4*>(j.dst + row * dst_pitch);
    const uint64_t step = static_cast<uint64_t>(gridDim.x) * Threads * Unroll;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(Threads) * Unroll + threadIdx.x; i < vecs; i += step) {
      uint4 v[Unroll];
#pragma unroll
      for (int u = 0; u < Unroll; ++u)
        if (i + u * Threads < vecs) v[u] = Stream ? __ldcs(s + i + u * Threads) : s[i + u * Threads];
#pragma unroll
      for (int u = 0; u < Unroll; ++u)
        if (i + u * Threads < vecs) {
          if (Stream)
            __stcs(d + i + u * Threads, v[u]);
          else
            d[i + u * Threads] = v[u];
        }
    }
  }
}

__global__ void copy_rows_kernel(const Job* __restrict__ jobs, uint64_t dst_pitch, uint64_t src_pitch, uint64_t vecs,
                                 uint64_t height, uint64_t rows, const int32_t* gate, int64_t first) {
  copy_rows(jobs, dst_pitch, src_pitch, vecs, height, rows, gate, first);
}

__global__ void copy_rows_param_kernel(const __grid_constant__ ParamJobs jobs, uint64_t dst_pitch, uint64_t src_pitch,
                                       uint64_t vecs, uint64_t height, uint64_t rows, const int32_t* gate,
                                       int64_t first) {
  copy_rows(jobs.job, dst_pitch, src_pitch, vecs, height, rows, gate, first);
}

int copy_rows_launch(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, uint64_t dst_pitch,
                     uint64_t src_pitch, uint64_t width, uint64_t height, const int32_t* gate, int64_t first,
                     void* stream_ptr, char* err, size_t err_len) {
  if (!count || !width || !height) return KVS_OK;
  if (!dsts || !srcs) return kvs::fail(err, err_len, KVS_EINVAL, "null pointer argument");
  uint64_t bits = dst_pitch | src_pitch | width;
  for (uint32_t i = 0; i < count; ++i) bits |= dsts[i] | srcs[i];
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t e;
  if (bits % 16 && gate)
    return kvs::fail(err, err_len, KVS_EINVAL,
                     "gated row copies need 16-byte aligned addresses, pitches and widths (the copy engine "
                     "cannot read a device gate)");
  if (bits % 16) {  // unaligned: the copy engine, one 2D copy per job
    for (uint32_t i = 0; i < count; ++i) {
      e = cudaMemcpy2DAsync(reinterpret_cast<void*>(dsts[i]), dst_pitch, reinterpret_cast<const void*>(srcs[i]),
                            src_pitch, width, height, cudaMemcpyDefault, stream);
      if (e != cudaSuccess) return kvs::fail(err, err_len, KVS_ECUDA, "cudaMemcpy2DAsync: %s", cudaGetErrorString(e));
    }
    return KVS_OK;
  }
  const uint64_t vecs = width / 16, rows = static_cast<uint64_t>(count) * height;
  const uint64_t per_block = static_cast<uint64_t>(kThreads) * kUnroll;
  const uint64_t bx64 = (vecs + per_block - 1) / per_block;
  const unsigned bx = static_cast<unsigned>(bx64 < 1024 ? bx64 : 1024);
  const unsigned by = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  if (count <= kParamJobs) {
    ParamJobs p;
    for (uint32_t i = 0; i < count; ++i) p.job[i] = Job{dsts[i], srcs[i]};
    copy_rows_param_kernel<<<dim3(bx, by), kThreads, 0, stream>>>(p, dst_pitch, src_pitch, vecs, height, rows, gate,
                                                                  first);
    e = cudaGetLastError();
    if (e != cudaSuccess) return kvs::fail(err, err_len, KVS_ECUDA, "copy_rows: %s", cudaGetErrorString(e));
    return KVS_OK;
  }
  std::vector<Job> host(count);
  for (uint32_t i = 0; i < count; ++i) host[i] = Job{dsts[i], srcs[i]};
  void* dev = nullptr;
  e = cudaMallocAsync(&dev, count * sizeof(Job), stream);
  if (e != cudaSuccess) return kvs::fail(err, err_len, KVS_ECUDA, "cudaMallocAsync: %s", cudaGetErrorString(e));
  e = cudaMemcpyAsync(dev, host.data(), count * sizeof(Job), cudaMemcpyHostToDevice, stream);  // pageable: staged
  if (e == cudaSuccess) {
    copy_rows_kernel<<<dim3(bx, by), kThreads, 0, stream>>>(static_cast<const Job*>(dev), dst_pitch, src_pitch, vecs,
                                                            height, rows, gate, first);
    e = cudaGetLastError();
  }
  cudaFreeAsync(dev, stream);
  if (e != cudaSuccess) return kvs::fail(err, err_len, KVS_ECUDA, "copy_rows: %s", cudaGetErrorString(e));
  return KVS_OK;
}

}  // namespace

KVS_API int kvs_cuda_copy_rows(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, uint64_t dst_pitch,
                               uint64_t src_pitch, uint64_t width, uint64_t height, void* stream_ptr, char* err,
                               size_t err_len) {
  return copy_rows_launch(count, dsts, srcs, dst_pitch, src_pitch, width, height, nullptr, 0, stream_ptr, err,
                          err_len);
}

KVS_API int kvs_cuda_copy_rows_gated(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, uint64_t dst_pitch,
                                     uint64_t src_pitch, uint64_t width, uint64_t height, const int32_t* gate,
                                     int32_t first, void* stream_ptr, char* err, size_t err_len) {
  if (!gate) return kvs::fail(err, err_len, KVS_EINVAL, "null gate");
  return copy_rows_launch(count, dsts, srcs, dst_pitch, src_pitch, width, height, gate, first, stream_ptr, err,
                          err_len);
}
