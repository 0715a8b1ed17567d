// Pieces shared by the CUDA codec units (codec.cu: the first encoder and decoder;
// codec_decode.cu: the batched decoder and the pipelined load; codec_encode.cu: the batched
// encoder). Host helpers are inline; device tables are per translation unit (no -rdc), each
// unit uploads its own copy once per device through upload_models().
#pragma once
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "codec/common.h"
#include "codec/format.h"
#include "codec/tables.h"

namespace kvc_cuda {

// Error codes a kernel leaves in its error word (err[0]); err[1] = segment, err[2] = chunk.
enum DevError : int {
  kErrNone = 0, kErrStream = 1, kErrValue = 2, kErrLayout = 3, kErrMeta = 4, kErrEnd = 5, kErrHeader = 6
};

inline const char* dev_error_text(int code) {
  switch (code) {
    case kErrStream: return "lane stream exhausted";
    case kErrValue: return "value out of range";
    case kErrLayout: return "segment layout out of bounds or rANS state out of range";
    case kErrMeta: return "malformed channel table";
    case kErrEnd: return "lane does not end cleanly / trailing bytes";
    case kErrHeader: return "header is not a lossy bitstream of the expected shape, dtype and size";
    default: return "unknown";
  }
}

inline bool cuda_ok(cudaError_t st, kvc::Error& e, const char* what) {
  if (st == cudaSuccess) return true;
  return e.fail("CUDA %s failed: %s", what, cudaGetErrorString(st));
}

// Device buffers of one call (stream-ordered), freed on every exit path.
struct DevBuffers {
  cudaStream_t st;
  std::vector<void*> ptrs;
  explicit DevBuffers(cudaStream_t s) : st(s) {}
  DevBuffers(const DevBuffers&) = delete;
  DevBuffers& operator=(const DevBuffers&) = delete;
  template <class T>
  bool alloc(T** p, uint64_t bytes, kvc::Error& e) {
    void* v = nullptr;
    if (!cuda_ok(cudaMallocAsync(&v, bytes ? bytes : 1, st), e, "cudaMallocAsync")) return false;
    ptrs.push_back(v);
    *p = static_cast<T*>(v);
    return true;
  }
  ~DevBuffers() {
    for (void* p : ptrs) cudaFreeAsync(p, st);
  }
};

// Slots per bucket of the compact decode table: 4096 / 16 = 256 buckets per model. A bucket
// names the symbol of its first slot; the decoder steps forward from there (at most a few
// steps, only inside the thin tail symbols), so the table is 16 KiB instead of 256 KiB.
constexpr uint32_t kBucketShift = 4;
constexpr uint32_t kBuckets = KVC_PROB_TOTAL >> kBucketShift;

// The 64 static models in the compact form the batched kernels read (45.8 KB: fits the
// shared memory of one block). ent[moff[k] + z] = cum | freq << 16 of symbol z of model k.
struct alignas(16) CompactModels {
  uint32_t ent[KVC_MODEL_FREQ_TOTAL];
  uint16_t moff[KVC_NUM_MODELS];
  uint16_t lim[KVC_NUM_MODELS];
  uint8_t bucket[KVC_NUM_MODELS][kBuckets];
};
static_assert(sizeof(CompactModels) % 16 == 0, "copied to shared memory in 16-byte words");

inline void build_compact(CompactModels& m) {
  memset(&m, 0, sizeof m);
  for (int k = 0; k < KVC_NUM_MODELS; k++) {
    const uint32_t n = kvc_model_limit[k] + 1u, off = kvc_model_offset[k];
    m.moff[k] = (uint16_t)off;
    m.lim[k] = kvc_model_limit[k];
    uint32_t c = 0, z = 0;
    for (uint32_t s = 0; s < n; s++) {
      const uint32_t f = kvc_model_freq[off + s];
      m.ent[off + s] = c | (f << 16);
      c += f;
    }
    c = 0;
    for (uint32_t b = 0; b < kBuckets; b++) {
      const uint32_t slot = b << kBucketShift;
      while (c + kvc_model_freq[off + z] <= slot) c += kvc_model_freq[off + z++];
      m.bucket[k][b] = (uint8_t)z;
    }
  }
}

// Memory the device's default pool (cudaMallocAsync) keeps across synchronisations instead of
// returning it to the driver: the batched calls allocate their scratch per call, and with the
// pool's default threshold of 0 every call would map and unmap it again. Only ever raised.
constexpr uint64_t kPoolKeepBytes = 2ull << 30;

inline bool keep_pool_memory(int dev, kvc::Error& e) {
  cudaMemPool_t pool;
  if (!cuda_ok(cudaDeviceGetDefaultMemPool(&pool, dev), e, "default mem pool")) return false;
  uint64_t cur = 0;
  if (!cuda_ok(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &cur), e, "pool attribute")) return false;
  if (cur >= kPoolKeepBytes) return true;
  uint64_t keep = kPoolKeepBytes;
  return cuda_ok(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), e, "pool attribute");
}

// Uploads the compact models into `sym` (a __device__ CompactModels of the calling unit) once
// per device and process.
template <class Symbol>
bool upload_models(const Symbol& sym, bool* done_per_device, std::mutex& mu, kvc::Error& e) {
  int dev = 0;
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice")) return false;
  if (dev < 0 || dev >= 64) return e.fail("device ordinal %d out of range", dev);
  std::lock_guard<std::mutex> lock(mu);
  if (done_per_device[dev]) return true;
  std::vector<CompactModels> hm(1);
  build_compact(hm[0]);
  if (!cuda_ok(cudaMemcpyToSymbol(sym, hm.data(), sizeof(CompactModels)), e, "model upload")) return false;
  if (!keep_pool_memory(dev, e)) return false;
  done_per_device[dev] = true;
  return true;
}

// Header + index of a batch of bitstreams, validated on the host (every chunk lossy, one shape).
// heads[i] holds at least the header and index of chunk i (host_lens[i] bytes of it; the
// payload is read only when verify_crc and host_lens[i] == lens[i]). Returns KVS_OK, or
// KVS_EINVAL (bad arguments, lossless, mixed shapes) / KVS_ECORRUPT (a bad header or index).
inline int parse_batch(uint32_t count, const uint8_t* const* heads, const uint64_t* host_lens,
                        const uint64_t* lens, bool verify_crc, kvc::Header& first, kvc::Error& e) {
  for (uint32_t i = 0; i < count; i++) {
    kvc::Header h;
    std::vector<kvc::IndexEntry> idx;
    const uint8_t* head = heads[i];
    const uint64_t host_n = host_lens[i], n = lens[i];
    if (head == nullptr || host_n > n) {
      e.fail("chunk %u: null pointer or host copy longer than the bitstream", i);
      return KVS_EINVAL;
    }
    uint32_t layers = 0;
    if (host_n >= KVC_HEADER_SIZE) memcpy(&layers, head + 12, 4);
    const uint64_t need = KVC_HEADER_SIZE + 16ull * (layers > KVC_MAX_LAYERS ? 0 : layers);
    if (host_n < KVC_HEADER_SIZE || host_n < need) {
      if (host_n == n) {  // the whole (too short) stream: a corrupt bitstream, as parse_container says
        kvc::parse_container(head, n, h, idx, false, e);
        return KVS_ECORRUPT;
      }
      e.fail("chunk %u: host copy must hold header + index (%llu bytes)", i, (unsigned long long)need);
      return KVS_EINVAL;
    }
    // Without payload verification parse_container reads only the header and the index.
    if (!kvc::parse_container(head, n, h, idx, verify_crc && host_n == n, e)) return KVS_ECORRUPT;
    if (h.level == KVC_LEVEL_LOSSLESS) {
      e.fail("lossless bitstreams decode on the CPU (kvstore.codec.decode)");
      return KVS_EINVAL;
    }
    if (i == 0) first = h;
    else if (h.lanes > first.lanes) first.lanes = h.lanes;  // the launch covers the most lanes of any chunk
    if (i > 0 && (h.dtype != first.dtype || h.layout != first.layout || h.layers != first.layers || h.tokens != first.tokens ||
             h.heads != first.heads || h.head_dim != first.head_dim)) {
      e.fail("chunk %u: shape or dtype differs from chunk 0 (a batch shares one shape)", i);
      return KVS_EINVAL;
    }
  }
  return KVS_OK;
}

}  // namespace kvc_cuda
