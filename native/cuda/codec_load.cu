// kvs_cuda_codec_load_batch: compressed chunks in host memory -> decoded chunks on the GPU.
//
// The bitstreams cross PCIe on a copy stream of the library's own, in groups of chunks; the
// caller's stream decodes group g (one launch of the batched decoder) while group g + 1 is in
// flight, ordered by one event per group. So the wall time is about the bitstreams' PCIe time
// plus one group's decode, and the effective rate is up to (compression ratio) x PCIe.
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "codec_decode.h"
#include "codec_shared.cuh"
#include "kvstore.h"

namespace {

using kvc::Error;
using kvc::Header;
using kvc::report;
using namespace kvc_cuda;

// Default grouping: one group per wave of the decoder. A decode launch is latency-bound (its time
// is one lane's serial chain) until it fills the GPU, so splitting a batch that fits one wave
// only adds launches; one group per kWarpsPerSmWave warps per multiprocessor overlaps the
// copies of group g + 1 with a decode that already keeps the GPU busy.
constexpr uint32_t kWarpsPerSmWave = 8;  // resident warps of k_decode_warp per SM (its shared models)
constexpr uint64_t kDevAlign = 256;        // device offset of each bitstream (aligned word reads)

// One non-blocking copy stream per device, created on first use, kept for the process.
bool copy_stream(cudaStream_t* out, Error& e) {
  static std::mutex mu;
  static cudaStream_t streams[64] = {nullptr};
  int dev = 0;
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice")) return false;
  if (dev < 0 || dev >= 64) return e.fail("device ordinal %d out of range", dev);
  std::lock_guard<std::mutex> lock(mu);
  if (!streams[dev] && !cuda_ok(cudaStreamCreateWithFlags(&streams[dev], cudaStreamNonBlocking), e, "stream create"))
    return false;
  *out = streams[dev];
  return true;
}

// Events of one call, destroyed on every exit path (after the caller's final synchronize).
struct Events {
  std::vector<cudaEvent_t> ev;
  bool make(size_t n, Error& e) {
    ev.resize(n, nullptr);
    for (auto& x : ev)
      if (!cuda_ok(cudaEventCreateWithFlags(&x, cudaEventDisableTiming), e, "event create")) return false;
    return true;
  }
  ~Events() {
    for (auto x : ev)
      if (x) cudaEventDestroy(x);
  }
};

uint32_t get32(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }
uint64_t get64(const uint8_t* p) { uint64_t v; memcpy(&v, p, 8); return v; }

}  // namespace

KVS_API int kvs_cuda_codec_load_batch(uint32_t count, const uint8_t* const* host_bufs, const uint64_t* lens,
                                      void* const* dev_dsts, uint64_t dst_bytes_each, uint32_t groups, void* stream,
                                      int verify_crc, char* err, size_t err_len) {
  Error e;
  if (count == 0) return KVS_OK;
  if (count > 65535 || !host_bufs || !lens || !dev_dsts) {
    e.fail("batch of %u chunks: 1..65535 chunks and non-null arrays required", count);
    return report(KVS_EINVAL, e, err, err_len);
  }
  for (uint32_t i = 0; i < count; i++)
    if (dev_dsts[i] == nullptr) {
      e.fail("chunk %u: null destination", i);
      return report(KVS_EINVAL, e, err, err_len);
    }
  Header h;
  const int pc = parse_batch(count, host_bufs, lens, lens, false, h, e);
  if (pc != KVS_OK) return report(pc, e, err, err_len);
  const uint64_t want = h.elements() * kvc_dtype_size(h.dtype);
  if (dst_bytes_each != want) {
    e.fail("destination has %llu bytes, chunk needs %llu", (unsigned long long)dst_bytes_each, (unsigned long long)want);
    return report(KVS_EINVAL, e, err, err_len);
  }
  if (groups == 0) {
    int dev = 0, sms = 0;
    if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice") ||
        !cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e, "device attribute"))
      return report(KVS_EINTERNAL, e, err, err_len);
    const uint64_t wave = (uint64_t)(sms > 0 ? sms : 1) * kWarpsPerSmWave;
    const uint64_t warps = (uint64_t)count * h.layers * h.segments();
    groups = (uint32_t)((warps + wave - 1) / wave);
  }
  if (groups > count) groups = count;
  if (!ensure_decode_models(e)) return report(KVS_EINTERNAL, e, err, err_len);
  int variant = decode_variant();
  if (variant == kDecoderFirst) variant = kDecoderDefault;  // the first decoder has no chunk offset
  cudaStream_t st = static_cast<cudaStream_t>(stream), cs = nullptr;
  if (!copy_stream(&cs, e)) return report(KVS_EINTERNAL, e, err, err_len);
  std::vector<uint64_t> off(count);
  uint64_t total = 0;
  for (uint32_t i = 0; i < count; i++) {
    off[i] = total;
    total += (lens[i] + kDevAlign - 1) / kDevAlign * kDevAlign;
  }
  const uint32_t L = h.layers;
  DevBuffers mem(st);
  uint8_t* dbuf;
  int* derr;
  uint64_t* args;  // [bufs | lens | dsts]
  uint32_t* dcrc = nullptr;
  if (!mem.alloc(&dbuf, total, e) || !mem.alloc(&derr, 16, e) || !mem.alloc(&args, 24ull * count, e) ||
      (verify_crc && !mem.alloc(&dcrc, 4ull * count * L, e)))
    return report(KVS_EINTERNAL, e, err, err_len);
  std::vector<uint64_t> hargs(3ull * count);
  for (uint32_t i = 0; i < count; i++) {
    hargs[i] = (uint64_t)(uintptr_t)(dbuf + off[i]);
    hargs[count + i] = lens[i];
    hargs[2ull * count + i] = (uint64_t)(uintptr_t)dev_dsts[i];
  }
  Events ev;
  if (!ev.make(groups + 1, e) || !cuda_ok(cudaMemsetAsync(derr, 0, 16, st), e, "memset") ||
      !cuda_ok(cudaMemcpyAsync(args, hargs.data(), 24ull * count, cudaMemcpyHostToDevice, st), e, "copy batch") ||
      !cuda_ok(cudaEventRecord(ev.ev[0], st), e, "event record") ||  // the allocations, before the copies
      !cuda_ok(cudaStreamWaitEvent(cs, ev.ev[0], 0), e, "stream wait"))
    return report(KVS_EINTERNAL, e, err, err_len);
  const uint8_t* const* d_bufs = reinterpret_cast<const uint8_t* const*>(args);
  const uint64_t* d_lens = args + count;
  void* const* d_dsts = reinterpret_cast<void* const*>(args + 2ull * count);
  for (uint32_t g = 0; g < groups; g++) {
    const uint32_t g0 = (uint32_t)((uint64_t)count * g / groups), g1 = (uint32_t)((uint64_t)count * (g + 1) / groups);
    for (uint32_t i = g0; i < g1; i++)
      if (!cuda_ok(cudaMemcpyAsync(dbuf + off[i], host_bufs[i], lens[i], cudaMemcpyHostToDevice, cs), e, "bitstream copy"))
        return report(KVS_EINTERNAL, e, err, err_len);
    if (!cuda_ok(cudaEventRecord(ev.ev[g + 1], cs), e, "event record") ||
        !cuda_ok(cudaStreamWaitEvent(st, ev.ev[g + 1], 0), e, "stream wait") ||
        !enqueue_decode(variant, h, g1 - g0, g0, d_bufs + g0, d_lens + g0, d_dsts + g0, derr, st, e))
      return report(KVS_EINTERNAL, e, err, err_len);
  }
  std::vector<uint32_t> crcs(verify_crc ? (size_t)count * L : 0);
  if (verify_crc) {  // every layer's CRC32C over the device copy, compared on the host below
    std::vector<uint64_t> ptrs((size_t)count * L), sizes((size_t)count * L);
    for (uint32_t i = 0; i < count; i++)
      for (uint32_t l = 0; l < L; l++) {
        const uint8_t* ie = host_bufs[i] + KVC_HEADER_SIZE + 16ull * l;
        ptrs[(size_t)i * L + l] = (uint64_t)(uintptr_t)(dbuf + off[i] + h.payload_offset() + get64(ie));
        sizes[(size_t)i * L + l] = get32(ie + 8);
      }
    char cerr[256] = {0};
    const uint32_t n = count * L;
    for (uint32_t s0 = 0; s0 < n; s0 += 65535) {  // the CRC batch takes at most 65535 buffers
      const uint32_t m = n - s0 < 65535 ? n - s0 : 65535;
      const int rc = kvs_cuda_crc32c_batch(m, ptrs.data() + s0, sizes.data() + s0, dcrc + s0, st, cerr, sizeof cerr);
      if (rc != KVS_OK) {
        e.fail("layer checksums on the GPU: %s", cerr);
        return report(rc, e, err, err_len);
      }
    }
    if (!cuda_ok(cudaMemcpyAsync(crcs.data(), dcrc, 4ull * n, cudaMemcpyDeviceToHost, st), e, "copy checksums"))
      return report(KVS_EINTERNAL, e, err, err_len);
  }
  int herr[4] = {0, 0, 0, 0};
  if (!cuda_ok(cudaMemcpyAsync(herr, derr, 16, cudaMemcpyDeviceToHost, st), e, "copy error flag") ||
      !cuda_ok(cudaStreamSynchronize(st), e, "compressed load"))
    return report(KVS_EINTERNAL, e, err, err_len);
  for (uint32_t i = 0; i < (verify_crc ? count : 0); i++)
    for (uint32_t l = 0; l < L; l++)
      if (crcs[(size_t)i * L + l] != get32(host_bufs[i] + KVC_HEADER_SIZE + 16ull * l + 12)) {
        e.fail("chunk %u layer %u checksum mismatch (corrupt payload)", i, l);
        return report(KVS_ECORRUPT, e, err, err_len);
      }
  if (herr[0] != 0) {
    const uint32_t S = h.segments();
    e.fail("corrupt lossy bitstream (chunk %d, layer %u segment %u): %s", herr[2], (unsigned)herr[1] / S,
           (unsigned)herr[1] % S, dev_error_text(herr[0]));
    return report(KVS_ECORRUPT, e, err, err_len);
  }
  return KVS_OK;
}
