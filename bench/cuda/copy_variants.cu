// Device-to-device copy variants for HBM-tier loads (pool chunk [planes, row] -> its place in an
// engine tensor, rows `pitch` apart), timed beside the D2D ceiling of the same run. Standalone:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -Inative/include -Inative/cuda \
//     -Inative/src -o copy_variants bench/cuda/copy_variants.cu native/src/error.cpp
//   ./copy_variants            (prints one line per shape and variant: median ms, GB/s, % of D2D, bit-exact)
// Variants: the landed copy_rows kernel (rows.cu), the same with streaming cache hints, a tiled
// persistent grid, a bulk-copy (TMA, cp.async.bulk through shared memory) kernel, one
// cudaMemcpyAsync per row, cudaMemcpyBatchAsync, one cudaMemcpy2DAsync per chunk.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#define CK(x)                                                                                         \
  do {                                                                                                \
    cudaError_t e_ = (x);                                                                             \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));         \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

// The landed kernel's row loop (rows.cu, anonymous namespace: its Job, kParamJobs, copy_rows<>).
#include "../../native/cuda/rows.cu"

namespace {

using Jobs = ParamJobs;

// ---- A/B: the landed row loop at other block shapes, with or without streaming cache hints --
template <int kT, int kU, bool kStream>
__global__ void rows_kernel(const __grid_constant__ Jobs jobs, uint64_t dst_pitch, uint64_t src_pitch, uint64_t vecs,
                            uint64_t height, uint64_t rows) {
  copy_rows<kT, kU, kStream>(jobs.job, dst_pitch, src_pitch, vecs, height, rows);
}

// ---- C: tiles of a flat index, persistent grid ----------------------------------------------
// Tile t covers vectors [ (t % tiles_per_row) * tile, +tile ) of row t / tiles_per_row.
template <int kThreads, int kUnroll, bool kStream>
__global__ void tiles_kernel(const __grid_constant__ Jobs jobs, uint64_t dst_pitch, uint64_t src_pitch, uint64_t vecs,
                             uint64_t height, uint64_t tiles_per_row, uint64_t tiles) {
  constexpr uint64_t kTile = static_cast<uint64_t>(kThreads) * kUnroll;
  for (uint64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const uint64_t r = t / tiles_per_row, c = (t % tiles_per_row) * kTile;
    const Job j = jobs.job[r / height];
    const uint64_t row = r % height;
    const uint4* s = reinterpret_cast<const uint4*>(j.src + row * src_pitch) + c;
    uint4* d = reinterpret_cast<uint4*>(j.dst + row * dst_pitch) + c;
    const uint64_t n = vecs - c < kTile ? vecs - c : kTile;
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (threadIdx.x + u * kThreads < n) v[u] = kStream ? __ldcs(s + threadIdx.x + u * kThreads) : s[threadIdx.x + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (threadIdx.x + u * kThreads < n) {
        if (kStream)
          __stcs(d + threadIdx.x + u * kThreads, v[u]);
        else
          d[threadIdx.x + u * kThreads] = v[u];
      }
  }
}

// ---- E: bulk copies (TMA) through shared memory ------------------------------------------------
// One elected thread per block moves tiles of kBulk bytes: global -> shared (completing on an
// mbarrier), then shared -> global (a bulk group), kStages tiles in flight.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int kBulk, int kStages>
__global__ void __launch_bounds__(32) bulk_kernel(const __grid_constant__ Jobs jobs, uint64_t dst_pitch,
                                                  uint64_t src_pitch, uint64_t width, uint64_t height,
                                                  uint64_t tiles_per_row, uint64_t tiles) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t bar[kStages];
  if (threadIdx.x != 0) return;
  for (int s = 0; s < kStages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bar[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  // This block's tiles: t = blockIdx.x + i * gridDim.x, i = 0 .. mine - 1.
  const uint64_t mine = blockIdx.x < tiles ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto where = [&](uint64_t i, uint64_t& src, uint64_t& dst, uint32_t& n) {
    const uint64_t t = blockIdx.x + i * gridDim.x, r = t / tiles_per_row, c = (t % tiles_per_row) * kBulk;
    const Job j = jobs.job[r / height];
    const uint64_t row = r % height;
    src = j.src + row * src_pitch + c;
    dst = j.dst + row * dst_pitch + c;
    n = static_cast<uint32_t>(width - c < kBulk ? width - c : kBulk);
  };
  auto load = [&](uint64_t i) {
    uint64_t src, dst;
    uint32_t n;
    where(i, src, dst, n);
    const int k = static_cast<int>(i % kStages);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&bar[k])), "r"(n) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(smem + k * kBulk)),
                 "l"(src), "r"(n), "r"(smem_u32(&bar[k]))
                 : "memory");
  };
  for (uint64_t i = 0; i < mine && i < kStages; ++i) load(i);
  for (uint64_t i = 0; i < mine; ++i) {
    const int k = static_cast<int>(i % kStages);
    const uint32_t parity = static_cast<uint32_t>((i / kStages) & 1);
    asm volatile(
        "{\n .reg .pred p;\n LAB_WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra LAB_WAIT_%=;\n}\n" ::"r"(
            smem_u32(&bar[k])),
        "r"(parity)
        : "memory");
    uint64_t src, dst;
    uint32_t n;
    where(i, src, dst, n);
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_u32(smem + k * kBulk)),
                 "r"(n)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    if (i >= 1) {  // the previous tile's store has read its stage: refill that stage
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      if (i - 1 + kStages < mine) load(i - 1 + kStages);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

struct Shape {
  const char* name;
  uint64_t row;     // bytes of one plane of one chunk
  uint64_t planes;  // planes per chunk
  int chunks;
};

int sms = 0;

float time_ms(cudaStream_t s, int reps, const std::function<void()>& fn) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> ts;
  fn();  // warm
  CK(cudaStreamSynchronize(s));
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a, s));
    fn();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return ts[ts.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = argc > 1 ? std::atoi(argv[1]) : 21;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  sms = prop.multiProcessorCount;
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  // Ceiling: one contiguous cudaMemcpyAsync D2D of 1 GiB (the `b.copy_(a)` of bench/gpu_all.py).
  const uint64_t big = 1ull << 30;
  unsigned char *a = nullptr, *b = nullptr;
  CK(cudaMalloc(&a, big));
  CK(cudaMalloc(&b, big));
  CK(cudaMemset(a, 1, big));
  const float ceil_ms = time_ms(s, reps, [&] { CK(cudaMemcpyAsync(b, a, big, cudaMemcpyDeviceToDevice, s)); });
  const double d2d = big / ceil_ms / 1e6;
  std::printf("D2D ceiling: cudaMemcpyAsync 1 GiB %.3f ms = %.0f GB/s\n", ceil_ms, d2d);
  CK(cudaFree(a));
  CK(cudaFree(b));

  const Shape shapes[] = {{"Llama-3-8B bf16 x16", 256ull * 8 * 128 * 2, 64, 16},
                          {"Llama-3-8B bf16 x64", 256ull * 8 * 128 * 2, 64, 64},
                          {"SmolLM2 fp16 x16", 256ull * 3 * 64 * 2, 60, 16},
                          {"SmolLM2 fp16 x64", 256ull * 3 * 64 * 2, 60, 64}};
  for (const Shape& sh : shapes) {
    const uint64_t chunk = sh.row * sh.planes, total = chunk * sh.chunks, pitch = sh.row * sh.chunks;
    unsigned char *pool = nullptr, *dst = nullptr;
    CK(cudaMalloc(&pool, total + (1 << 20)));
    CK(cudaMalloc(&dst, total));
    std::vector<unsigned char> host(total);
    for (uint64_t i = 0; i < total; ++i) host[i] = static_cast<unsigned char>((i * 2654435761ull) >> 13);
    CK(cudaMemcpy(pool, host.data(), total, cudaMemcpyHostToDevice));
    // Expected destination: chunk c plane p at dst + p * pitch + c * row.
    std::vector<unsigned char> want(total), got(total);
    for (int c = 0; c < sh.chunks; ++c)
      for (uint64_t p = 0; p < sh.planes; ++p)
        std::memcpy(&want[p * pitch + c * sh.row], &host[c * chunk + p * sh.row], sh.row);
    Jobs jobs;
    for (int c = 0; c < sh.chunks; ++c) jobs.job[c] = Job{reinterpret_cast<uint64_t>(dst) + c * sh.row,
                                                       reinterpret_cast<uint64_t>(pool) + c * chunk};
    const uint64_t vecs = sh.row / 16, rows = sh.planes * sh.chunks;
    auto check = [&]() -> bool {
      CK(cudaStreamSynchronize(s));
      CK(cudaMemcpy(got.data(), dst, total, cudaMemcpyDeviceToHost));
      bool ok = std::memcmp(got.data(), want.data(), total) == 0;
      CK(cudaMemset(dst, 0, total));
      return ok;
    };
    auto report = [&](const char* what, const std::function<void()>& fn) {
      CK(cudaMemset(dst, 0, total));
      fn();
      const bool ok = check();
      const float ms = time_ms(s, reps, fn);
      std::printf("%-22s %-44s %8.3f ms %7.0f GB/s %5.1f%% of D2D  bit-exact %s\n", sh.name, what, ms,
                  total / ms / 1e6, 100.0 * total / ms / 1e6 / d2d, ok ? "yes" : "NO");
    };
    auto rows_launch = [&](auto kernel, int threads, int unroll) {
      const uint64_t per = static_cast<uint64_t>(threads) * unroll, bx64 = (vecs + per - 1) / per;
      const unsigned bx = static_cast<unsigned>(std::min<uint64_t>(bx64, 1024));
      const unsigned by = static_cast<unsigned>(std::min<uint64_t>(rows, 65535));
      kernel<<<dim3(bx, by), threads, 0, s>>>(jobs, pitch, sh.row, vecs, sh.planes, rows);
      CK(cudaGetLastError());
    };
    std::vector<uint64_t> dsts, srcs;
    for (int c = 0; c < sh.chunks; ++c) {
      dsts.push_back(jobs.job[c].dst);
      srcs.push_back(jobs.job[c].src);
    }
    report("A rows 256x8 (landed)", [&] {
      char err[256];
      if (kvs_cuda_copy_rows(sh.chunks, dsts.data(), srcs.data(), pitch, sh.row, sh.row, sh.planes, s, err, sizeof err))
        std::fprintf(stderr, "kvs_cuda_copy_rows: %s\n", err), std::exit(1);
    });
    report("B rows 256x8 streaming hints", [&] { rows_launch(rows_kernel<256, 8, true>, 256, 8); });
    report("A2 rows 512x4", [&] { rows_launch(rows_kernel<512, 4, false>, 512, 4); });
    report("A3 rows 128x16", [&] { rows_launch(rows_kernel<128, 16, false>, 128, 16); });
    report("B2 rows 512x8 streaming", [&] { rows_launch(rows_kernel<512, 8, true>, 512, 8); });
    auto tiles_launch = [&](auto kernel, int threads, int unroll, int per_sm) {
      const uint64_t tile = static_cast<uint64_t>(threads) * unroll, tpr = (vecs + tile - 1) / tile;
      const uint64_t tiles = tpr * rows;
      const unsigned grid = static_cast<unsigned>(std::min<uint64_t>(tiles, static_cast<uint64_t>(sms) * per_sm));
      kernel<<<grid, threads, 0, s>>>(jobs, pitch, sh.row, vecs, sh.planes, tpr, tiles);
      CK(cudaGetLastError());
    };
    report("C tiles 256x8 persistent 8/SM", [&] { tiles_launch(tiles_kernel<256, 8, false>, 256, 8, 8); });
    report("C2 tiles 256x8 streaming 8/SM", [&] { tiles_launch(tiles_kernel<256, 8, true>, 256, 8, 8); });
    report("C3 tiles 512x8 streaming 4/SM", [&] { tiles_launch(tiles_kernel<512, 8, true>, 512, 8, 4); });
    report("C4 tiles 256x8 one block per tile", [&] { tiles_launch(tiles_kernel<256, 8, false>, 256, 8, 1 << 20); });
    auto bulk_launch = [&](auto kernel, int bulk, int stages, int per_sm) {
      const uint64_t tpr = (sh.row + bulk - 1) / bulk, tiles = tpr * rows;
      const int smem = bulk * stages;
      CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      const unsigned grid = static_cast<unsigned>(std::min<uint64_t>(tiles, static_cast<uint64_t>(sms) * per_sm));
      kernel<<<grid, 32, smem, s>>>(jobs, pitch, sh.row, sh.row, sh.planes, tpr, tiles);
      CK(cudaGetLastError());
    };
    report("E bulk TMA 16KB x4 stages, 3/SM", [&] { bulk_launch(bulk_kernel<16384, 4>, 16384, 4, 3); });
    report("E2 bulk TMA 32KB x3 stages, 2/SM", [&] { bulk_launch(bulk_kernel<32768, 3>, 32768, 3, 2); });
    report("E3 bulk TMA 8KB x8 stages, 3/SM", [&] { bulk_launch(bulk_kernel<8192, 8>, 8192, 8, 3); });
    report("E4 bulk TMA 16KB x6 stages, 2/SM", [&] { bulk_launch(bulk_kernel<16384, 6>, 16384, 6, 2); });
    report("F cudaMemcpyAsync per row", [&] {
      for (int c = 0; c < sh.chunks; ++c)
        for (uint64_t p = 0; p < sh.planes; ++p)
          CK(cudaMemcpyAsync(dst + p * pitch + c * sh.row, pool + c * chunk + p * sh.row, sh.row,
                             cudaMemcpyDeviceToDevice, s));
    });
    {
      std::vector<void*> ds;
      std::vector<const void*> ss;
      std::vector<size_t> ns;
      for (int c = 0; c < sh.chunks; ++c)
        for (uint64_t p = 0; p < sh.planes; ++p) {
          ds.push_back(dst + p * pitch + c * sh.row);
          ss.push_back(pool + c * chunk + p * sh.row);
          ns.push_back(sh.row);
        }
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      size_t idx = 0;
      report("G cudaMemcpyBatchAsync (one call)", [&] {
        CK(cudaMemcpyBatchAsync(ds.data(), const_cast<const void**>(ss.data()), ns.data(), ds.size(), &attr, &idx, 1,
                                s));
      });
    }
    report("H cudaMemcpy2DAsync per chunk", [&] {
      for (int c = 0; c < sh.chunks; ++c)
        CK(cudaMemcpy2DAsync(dst + c * sh.row, pitch, pool + c * chunk, sh.row, sh.row, sh.planes,
                             cudaMemcpyDeviceToDevice, s));
    });
    {  // contiguous reference of the same byte count: how much the row form itself costs
      const float ms = time_ms(s, reps, [&] { CK(cudaMemcpyAsync(dst, pool, total, cudaMemcpyDeviceToDevice, s)); });
      std::printf("%-22s %-44s %8.3f ms %7.0f GB/s %5.1f%% of D2D\n", sh.name, "contiguous cudaMemcpyAsync, same bytes",
                  ms, total / ms / 1e6, 100.0 * total / ms / 1e6 / d2d);
    }
    CK(cudaFree(pool));
    CK(cudaFree(dst));
  }
  return 0;
}
