// kvs_cuda_codec_load_batch: compressed chunks in host memory -> decoded chunks on the GPU.
//
// The bitstreams cross PCIe on a copy stream of the library's own, in groups of chunks; the
// caller's stream decodes group g (one launch of the batched decoder) while group g + 1 is in
// flight, ordered by one event per group. So the wall time is about the bitstreams' PCIe time
// plus one group's decode, and the effective rate is up to (compression ratio) x PCIe.
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "codec_decode.h"
#include "codec_shared.cuh"
#include "crc_batch.h"
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

// The library's non-blocking streams per device (0: the copy stream, 1: the mapped load's
// second decode stream), created on first use, kept for the process.
bool lib_stream(int which, cudaStream_t* out, Error& e) {
  static std::mutex mu;
  static cudaStream_t streams[2][64] = {{nullptr}};
  int dev = 0;
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice")) return false;
  if (dev < 0 || dev >= 64) return e.fail("device ordinal %d out of range", dev);
  std::lock_guard<std::mutex> lock(mu);
  cudaStream_t& s = streams[which][dev];
  if (!s && !cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), e, "stream create")) return false;
  *out = s;
  return true;
}
bool copy_stream(cudaStream_t* out, Error& e) { return lib_stream(0, out, e); }

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

// Decoder waves that `warps` warps fill on this device: ceil(warps / (SMs * kWarpsPerSmWave)).
bool decoder_waves(uint64_t warps, uint64_t* waves, Error& e) {
  int dev = 0, sms = 0;
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice") ||
      !cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e, "device attribute"))
    return false;
  const uint64_t wave = (uint64_t)(sms > 0 ? sms : 1) * kWarpsPerSmWave;
  *waves = (warps + wave - 1) / wave;
  return true;
}

// Device offsets of `n` bitstreams of lens[i] bytes packed kDevAlign-aligned into one buffer;
// returns the buffer's size.
uint64_t device_offsets(const uint64_t* lens, uint32_t n, std::vector<uint64_t>& off) {
  off.resize(n);
  uint64_t total = 0;
  for (uint32_t i = 0; i < n; i++) {
    off[i] = total;
    total += (lens[i] + kDevAlign - 1) / kDevAlign * kDevAlign;
  }
  return total;
}

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
    uint64_t waves = 0;
    if (!decoder_waves((uint64_t)count * h.layers * h.segments() * lane_groups(h.lanes, (uint32_t)h.channels()), &waves, e))
      return report(KVS_EINTERNAL, e, err, err_len);
    groups = (uint32_t)waves;
  }
  if (groups > count) groups = count;
  if (!ensure_decode_models(e)) return report(KVS_EINTERNAL, e, err, err_len);
  int variant = decode_variant();
  if (variant == kDecoderFirst) variant = kDecoderDefault;  // the first decoder has no chunk offset
  cudaStream_t st = static_cast<cudaStream_t>(stream), cs = nullptr;
  if (!copy_stream(&cs, e)) return report(KVS_EINTERNAL, e, err, err_len);
  std::vector<uint64_t> off;
  const uint64_t total = device_offsets(lens, count, off);
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

// kvs_cuda_codec_load_mapped: see include/kvstore.h. Timeline per call, groups g = 0, 1, ...:
//   copy stream:      H2D(g0) | H2D(g1) | ...
//   decode stream g%2:          CRC(g0) -> decode(g0, gated)
//   decode stream 1-g%2:                  CRC(g1) -> decode(g1, gated)  (runs beside decode g0)
// A group's decode waits for its own bitstreams and for the CRCs of every earlier group (the
// gate reads them), never for an earlier decode: decodes of consecutive groups run together
// (one lane chain is a decode's latency, so serialising groups would add one per group).
KVS_API int kvs_cuda_codec_load_mapped(uint32_t count, const uint8_t* const* host_bufs, const uint64_t* lens,
                                       const uint32_t* want_crcs, int dtype, int layout, uint32_t layers,
                                       uint32_t tokens, uint32_t heads, uint32_t head_dim, const uint64_t* plane_ptrs,
                                       const uint64_t* token_offs, uint32_t run_elems, uint64_t run_stride,
                                       uint32_t groups, void* stream, int verify_host, uint32_t* proven,
                                       uint32_t* failed, char* err, size_t err_len) {
  Error e;
  if (proven) *proven = 0;
  if (failed) *failed = count;
  if (count == 0) return KVS_OK;
  if (count > 65535 || !host_bufs || !lens || !plane_ptrs || !token_offs || !proven || !failed) {
    e.fail("batch of %u chunks: 1..65535 chunks and non-null arrays required", count);
    return report(KVS_EINVAL, e, err, err_len);
  }
  Header h;
  h.level = 1;  // any lossy level: the shape checks of the lossy format
  h.dtype = (uint8_t)dtype;
  h.layout = (uint8_t)layout;
  h.layers = layers, h.tokens = tokens, h.heads = heads, h.head_dim = head_dim;
  if (dtype < 0 || dtype > 255 || layout < 0 || layout > 255 || !kvc::check_shape(h, e))
    return report(KVS_EINVAL, e, err, err_len);
  const uint32_t B = kvc_dtype_size(h.dtype), P = layers * h.segments(), C = (uint32_t)h.channels();
  if (run_elems == 0 || C % run_elems != 0 || run_stride % B != 0) {
    e.fail("channel runs of %u elements every %llu bytes do not tile %u channels of %u bytes", run_elems,
           (unsigned long long)run_stride, C, B);
    return report(KVS_EINVAL, e, err, err_len);
  }
  for (uint64_t i = 0; i < (uint64_t)count * P; i++)
    if (plane_ptrs[i] == 0 || plane_ptrs[i] % B != 0) {
      e.fail("chunk %llu plane %llu: null or misaligned destination", (unsigned long long)(i / P),
             (unsigned long long)(i % P));
      return report(KVS_EINVAL, e, err, err_len);
    }
  for (uint64_t i = 0; i < (uint64_t)count * tokens; i++)
    if (token_offs[i] % B != 0) {
      e.fail("chunk %llu token %llu: offset not a multiple of the element size", (unsigned long long)(i / tokens),
             (unsigned long long)(i % tokens));
      return report(KVS_EINVAL, e, err, err_len);
    }
  // verify_host (memory that cannot change under the call): the host copies are parsed and their
  // layer CRCs checked first; the first that fails ends the chunks loaded.
  uint32_t n = count;
  Error host_err;
  if (verify_host)
    for (uint32_t i = 0; i < count && n == count; i++) {
      Header hi;
      std::vector<kvc::IndexEntry> idx;
      if (!host_bufs[i] || !kvc::parse_container(host_bufs[i], lens[i], hi, idx, true, host_err)) n = i;
      else if (hi.level == KVC_LEVEL_LOSSLESS || hi.dtype != h.dtype || hi.layout != h.layout ||
               hi.layers != layers || hi.tokens != tokens || hi.heads != heads || hi.head_dim != head_dim) {
        host_err.fail("not a lossy bitstream of the expected shape and dtype");
        n = i;
      }
      if (n == i) host_err.msg = "chunk " + std::to_string(i) + ": " + host_err.msg;
    }
  for (uint32_t i = 0; i < n; i++)
    if (!host_bufs[i] || lens[i] < h.payload_offset()) {
      e.fail("chunk %u: null bitstream or shorter than its header and index (%llu bytes)", i,
             (unsigned long long)lens[i]);
      return report(KVS_EINVAL, e, err, err_len);
    }
  if (n == 0) {
    *failed = 0;
    e.msg = host_err.msg;
    return report(KVS_ECORRUPT, e, err, err_len);
  }
  // The launch's lane groups cover the most lanes any chunk's header names (read here from host
  // memory; the decoder reads each chunk's count again from its device copy and rejects a
  // chunk whose count is invalid or above what the launch covers).
  h.lanes = KVC_LANES_DEFAULT;
  for (uint32_t i = 0; i < n; i++) {
    const uint8_t l = host_bufs[i][33];
    if (kvc_lanes_valid(l) && l > h.lanes) h.lanes = l;
  }
  if (!ensure_decode_models(e)) return report(KVS_EINTERNAL, e, err, err_len);
  int variant = decode_variant();
  if (variant == kDecoderFirst) variant = kDecoderDefault;
  if (groups == 0) {
    // Two groups per resident wave of the decoder: the second group's copies and CRC run under
    // the first's decode. A decode is one lane chain long whatever its size, and groups g and
    // g + 2 share a stream, so more groups than that only add chains.
    uint64_t resident = 0;
    if (!mapped_resident_warps(&resident, e)) return report(KVS_EINTERNAL, e, err, err_len);
    const uint64_t warps = (uint64_t)n * P * lane_groups(h.lanes, C);
    groups = (uint32_t)(2 * ((warps + resident - 1) / resident));
  }
  if (groups > n) groups = n;
  cudaStream_t st = static_cast<cudaStream_t>(stream), cs = nullptr, d1 = nullptr;
  if (!lib_stream(0, &cs, e) || !lib_stream(1, &d1, e)) return report(KVS_EINTERNAL, e, err, err_len);
  std::vector<uint64_t> off;
  const uint64_t total = device_offsets(lens, n, off);
  // One argument block: bufs[n] | lens[n] | planes[n*P] | toks[n*T] | want[n] got[n] (u32) | err[4] (i32).
  const uint64_t words = 2ull * n + (uint64_t)n * P + (uint64_t)n * tokens;
  const uint64_t arg_bytes = 8 * words + 8ull * n + 16;
  std::vector<uint64_t> hargs((arg_bytes + 7) / 8, 0);
  DevBuffers mem(st);
  // On every exit the library's streams are done with this call's buffers before they are freed
  // on `st` (an error may leave copies or decodes queued on them).
  struct Drain {
    cudaStream_t a, b;
    ~Drain() { cudaStreamSynchronize(a); cudaStreamSynchronize(b); }
  } drain{cs, d1};
  uint8_t* dbuf;
  uint64_t* args;
  uint32_t* d_scratch = nullptr;  // the CRC kernels' per-segment CRCs
  uint64_t max_len = 0;
  for (uint32_t i = 0; i < n; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
  const uint64_t scratch_words = kvs_cuda::crc32c_scratch_words(max_len);
  if (!mem.alloc(&dbuf, total, e) || !mem.alloc(&args, arg_bytes, e) ||
      (want_crcs && !mem.alloc(&d_scratch, 4 * scratch_words * n, e)))
    return report(KVS_EINTERNAL, e, err, err_len);
  for (uint32_t i = 0; i < n; i++) {
    hargs[i] = (uint64_t)(uintptr_t)(dbuf + off[i]);
    hargs[n + i] = lens[i];
  }
  memcpy(hargs.data() + 2ull * n, plane_ptrs, 8ull * n * P);
  memcpy(hargs.data() + 2ull * n + (uint64_t)n * P, token_offs, 8ull * n * tokens);
  uint32_t* hwant = reinterpret_cast<uint32_t*>(hargs.data() + words);
  if (want_crcs) memcpy(hwant, want_crcs, 4ull * n);
  int* herr0 = reinterpret_cast<int*>(hwant + 2ull * n);
  herr0[3] = 0x7F7F7F7F;  // no failing chunk yet (atomicMin)
  const uint8_t* const* d_bufs = reinterpret_cast<const uint8_t* const*>(args);
  const uint64_t* d_lens = args + n;
  uint32_t* d_want = reinterpret_cast<uint32_t*>(args + words);
  uint32_t* d_got = d_want + n;
  int* derr = reinterpret_cast<int*>(d_want + 2ull * n);
  DecodeMap map{args + 2ull * n, args + 2ull * n + (uint64_t)n * P, run_stride, run_elems, want_crcs ? d_got : nullptr,
                want_crcs ? d_want : nullptr};
  Events landed, checked, tail;
  if (!landed.make(groups + 1, e) || !checked.make(groups, e) || !tail.make(1, e) ||
      !cuda_ok(cudaMemcpyAsync(args, hargs.data(), arg_bytes, cudaMemcpyHostToDevice, st), e, "copy batch") ||
      !cuda_ok(cudaEventRecord(landed.ev[groups], st), e, "event record") ||  // allocations + arguments first
      !cuda_ok(cudaStreamWaitEvent(cs, landed.ev[groups], 0), e, "stream wait") ||
      !cuda_ok(cudaStreamWaitEvent(d1, landed.ev[groups], 0), e, "stream wait"))
    return report(KVS_EINTERNAL, e, err, err_len);
  // Every group's copies are queued first (the copy engine never waits for the host), then each
  // group's CRC and decode on its stream, in order.
  auto bounds = [&](uint32_t g) {
    return std::make_pair((uint32_t)((uint64_t)n * g / groups), (uint32_t)((uint64_t)n * (g + 1) / groups));
  };
  for (uint32_t g = 0; g < groups; g++) {
    const auto [g0, g1] = bounds(g);
    for (uint32_t i = g0; i < g1; i++)
      if (!cuda_ok(cudaMemcpyAsync(dbuf + off[i], host_bufs[i], lens[i], cudaMemcpyHostToDevice, cs), e, "bitstream copy"))
        return report(KVS_EINTERNAL, e, err, err_len);
    if (!cuda_ok(cudaEventRecord(landed.ev[g], cs), e, "event record")) return report(KVS_EINTERNAL, e, err, err_len);
  }
  for (uint32_t g = 0; g < groups; g++) {
    const auto [g0, g1] = bounds(g);
    cudaStream_t ds = (g % 2) ? d1 : st;
    if (!cuda_ok(cudaStreamWaitEvent(ds, landed.ev[g], 0), e, "stream wait")) return report(KVS_EINTERNAL, e, err, err_len);
    if (want_crcs) {  // checked[g]: the CRCs of groups 0..g are in d_got (the gate reads them all)
      if ((g > 0 && !cuda_ok(cudaStreamWaitEvent(ds, checked.ev[g - 1], 0), e, "stream wait")) ||
          !cuda_ok(kvs_cuda::crc32c_batch_device(g1 - g0, args + g0, d_lens + g0, max_len,
                                                 d_scratch + (uint64_t)g0 * scratch_words, d_got + g0, ds),
                   e, "bitstream checksums") ||
          !cuda_ok(cudaEventRecord(checked.ev[g], ds), e, "event record"))
        return report(KVS_EINTERNAL, e, err, err_len);
    }
    if (!enqueue_decode_mapped(variant, h, g1 - g0, g0, d_bufs + g0, d_lens + g0, map, derr, ds, e))
      return report(KVS_EINTERNAL, e, err, err_len);
  }
  std::vector<uint32_t> back(n + 4);  // got[n] | err[4], adjacent on the device: one copy back
  if (!cuda_ok(cudaEventRecord(tail.ev[0], d1), e, "event record") ||
      !cuda_ok(cudaStreamWaitEvent(st, tail.ev[0], 0), e, "stream wait") ||
      !cuda_ok(cudaMemcpyAsync(back.data(), d_got, 4ull * n + 16, cudaMemcpyDeviceToHost, st), e, "copy results") ||
      !cuda_ok(cudaStreamSynchronize(st), e, "mapped compressed load"))
    return report(KVS_EINTERNAL, e, err, err_len);
  const uint32_t* got = back.data();
  const int* herr = reinterpret_cast<const int*>(back.data() + n);
  uint32_t good = 0;
  while (good < n && (!want_crcs || got[good] == want_crcs[good])) good++;
  *proven = good;
  if (herr[0] != 0 && herr[3] >= 0 && (uint32_t)herr[3] < n) {
    const uint32_t S = h.segments();
    *failed = (uint32_t)herr[3];
    e.fail("corrupt lossy bitstream (chunk %d, layer %u segment %u): %s", herr[2], (unsigned)herr[1] / S,
           (unsigned)herr[1] % S, dev_error_text(herr[0]));
    if (herr[2] != herr[3]) e.msg += " (chunk " + std::to_string(herr[3]) + " is the first that failed)";
    return report(KVS_ECORRUPT, e, err, err_len);
  }
  if (n < count && good == n) {  // every chunk before the one the host check refused
    *failed = n;
    e.msg = host_err.msg;
    return report(KVS_ECORRUPT, e, err, err_len);
  }
  return KVS_OK;
}
