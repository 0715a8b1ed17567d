// CUDA implementation of the lossy KV codec, bit-exact with native/src/codec (CPU).
//
// Encode: k_plan (one block per segment: integer channel statistics, step codes, quantise,
// centre/predictor/model choice) -> k_encode_lanes (one thread per rANS lane, bytes written
// backwards into a per-lane scratch region) -> host reads lane sizes, lays out the payload
// -> k_gather (payload assembled on the device) -> one copy to host; header, index and
// CRC32C on the host. Decode: one thread per lane, fused with dequantisation, writing
// straight into the destination buffer; every read is bounds-checked on the device.
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "codec/common.h"
#include "codec/format.h"
#include "codec/levels.h"
#include "codec/tables.h"
#include "codec_decode.h"
#include "codec_shared.cuh"
#include "kvstore.h"
// Host parts shared with the CPU library: src/codec/format.cpp (header, index) is compiled
// into this library as its own unit; CRC32C is libkvstore.so's kvs_crc32c (linked).

namespace {

// The first encoder and decoder handle the default lane count only (32 lanes per segment); the
// decoder entry points hand streams of more lanes to the batched decoder.
constexpr uint32_t kLanes1 = KVC_LANES_DEFAULT;

using kvc::Error;
using kvc::Header;
using kvc::IndexEntry;
using kvc::report;
using kvc_cuda::cuda_ok;
using kvc_cuda::DevBuffers;
using kvc_cuda::dev_error_text;
using namespace kvc_cuda;  // DevError codes

struct DevModels {
  uint16_t limit[KVC_NUM_MODELS];
  uint16_t freq[KVC_NUM_MODELS][256];
  uint16_t cum[KVC_NUM_MODELS][257];
  uint8_t lookup[KVC_NUM_MODELS][KVC_PROB_TOTAL];
};

__device__ DevModels d_models;
__constant__ uint32_t d_thr[KVC_NUM_MODELS];

struct Policy {
  int32_t off[2][3];
  int32_t w[2];
};

bool init_models(Error& e) {
  static std::mutex mu;
  static bool done[64] = {false};
  int dev = 0;
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice")) return false;
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 64 && done[dev]) return true;
  std::vector<DevModels> hm(1);
  DevModels& m = hm[0];
  memset(&m, 0, sizeof m);
  for (int k = 0; k < KVC_NUM_MODELS; k++) {
    const uint32_t n = kvc_model_limit[k] + 1u;
    m.limit[k] = kvc_model_limit[k];
    uint32_t c = 0;
    for (uint32_t z = 0; z < 256; z++) {
      m.freq[k][z] = z < n ? kvc_model_freq[kvc_model_offset[k] + z] : 0;
      m.cum[k][z] = (uint16_t)c;
      for (uint32_t s = c; s < c + m.freq[k][z]; s++) m.lookup[k][s] = (uint8_t)z;
      c += m.freq[k][z];
    }
    m.cum[k][256] = (uint16_t)c;
  }
  if (!cuda_ok(cudaMemcpyToSymbol(d_models, &m, sizeof m), e, "model upload")) return false;
  if (!cuda_ok(cudaMemcpyToSymbol(d_thr, kvc_model_threshold_q16, sizeof(uint32_t) * KVC_NUM_MODELS), e,
               "threshold upload"))
    return false;
  if (dev < 64) done[dev] = true;
  return true;
}

// ---- encode ----------------------------------------------------------------------------

constexpr int kPlanThreads = 256;

// One block per segment. Per-segment scratch: tok_tm [T], coded [T] (coded token list),
// raw_count / raw_idx [KVC_MAX_RAW_TOKENS]; per-channel scratch: chan_lc, chan_qlmax, chan_const.
__global__ void k_plan(const void* __restrict__ src, int dtype, uint32_t L, uint32_t S, uint32_t T, uint32_t C,
                       Policy pol, uint8_t* __restrict__ meta, int16_t* __restrict__ q, int64_t* __restrict__ chan_lc,
                       int32_t* __restrict__ chan_qlmax, uint8_t* __restrict__ chan_const, int64_t* __restrict__ tok_tm,
                       uint32_t* __restrict__ coded_all, uint32_t* __restrict__ raw_count, uint32_t* __restrict__ raw_idx) {
  const uint32_t seg = blockIdx.x, l = seg / S, s = seg % S;
  const uint64_t base = (uint64_t)seg * T * C;
  int64_t* tm = tok_tm + (uint64_t)seg * T;
  uint32_t* coded = coded_all + (uint64_t)seg * T;
  __shared__ unsigned long long sum_bits;
  __shared__ uint32_t tc_shared;
  if (threadIdx.x == 0) sum_bits = 0;
  __syncthreads();
  // token outliers (kept verbatim), as select_raw_tokens() on the CPU
  int64_t local = 0;
  for (uint32_t t = threadIdx.x; t < T; t += blockDim.x) {
    int64_t sq = 0;
    for (uint32_t c = 0; c < C; c++) sq += kvc_qlog(kvc_sanitize(kvc_load(src, base + (uint64_t)t * C + c, dtype)));
    tm[t] = kvc_floordiv(sq, C);
    local += tm[t];
  }
  atomicAdd(&sum_bits, (unsigned long long)local);  // two's complement: exact, order free
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t mean = kvc_floordiv((int64_t)sum_bits, T);
    uint32_t r = 0, tc = 0;
    for (uint32_t t = 0; t < T; t++) {
      const bool raw = r < KVC_MAX_RAW_TOKENS && (tm[t] - mean >= KVC_RAW_TOKEN_DEVIATION || mean - tm[t] >= KVC_RAW_TOKEN_DEVIATION);
      if (raw) raw_idx[seg * KVC_MAX_RAW_TOKENS + r++] = t;
      else coded[tc++] = t;
    }
    raw_count[seg] = r;
    tc_shared = tc;
    sum_bits = 0;
  }
  __syncthreads();
  const uint32_t TC = tc_shared, TD = TC ? TC : 1;
  local = 0;
  for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
    int64_t sum_ql = 0;
    int32_t qlmax = KVC_QL_FLOOR;
    const uint32_t first = TC ? kvc_f2u(kvc_sanitize(kvc_load(src, base + (uint64_t)coded[0] * C + c, dtype))) : 0;
    uint8_t cst = 1;
    for (uint32_t i = 0; i < TC; i++) {
      const float v = kvc_sanitize(kvc_load(src, base + (uint64_t)coded[i] * C + c, dtype));
      if (kvc_f2u(v) != first) cst = 0;
      const int32_t ql = kvc_qlog(v);
      sum_ql += ql;
      qlmax = ql > qlmax ? ql : qlmax;
    }
    const int64_t lc = kvc_floordiv(sum_ql, TD);
    chan_lc[(uint64_t)seg * C + c] = lc;
    chan_qlmax[(uint64_t)seg * C + c] = qlmax;
    chan_const[(uint64_t)seg * C + c] = cst;
    local += lc;
  }
  atomicAdd(&sum_bits, (unsigned long long)local);
  __syncthreads();
  const int64_t lbar = kvc_floordiv((int64_t)sum_bits, C);
  const int g = kvc_layer_group(l, L);
  for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
    const uint64_t ch = (uint64_t)seg * C + c;
    const uint32_t code = kvc_step_code(chan_lc[ch], lbar, chan_qlmax[ch], pol.off[s][g], pol.w[s], chan_const[ch] != 0);
    const float step = kvc_step(code);
    int64_t sum_q = 0;
    for (uint32_t i = 0; i < TC; i++) {
      const uint64_t o = base + (uint64_t)coded[i] * C + c;
      const int32_t v = kvc_quantize(kvc_sanitize(kvc_load(src, o, dtype)), step);
      q[o] = (int16_t)v;
      sum_q += v;
    }
    const int32_t ctr = kvc_center(sum_q, TD);
    uint64_t cost_c = 0, cost_d = 0;
    int32_t prev = ctr;
    for (uint32_t i = 0; i < TC; i++) {
      const int32_t v = q[base + (uint64_t)coded[i] * C + c];
      cost_c += (uint64_t)abs(v - ctr);
      cost_d += (uint64_t)abs(v - prev);
      prev = v;
    }
    const bool delta = cost_d < cost_c;
    const uint32_t model = kvc_choose_model(delta ? cost_d : cost_c, TD, d_thr, KVC_NUM_MODELS) |
                           (delta ? KVC_MODEL_DELTA_BIT : 0u);
    uint8_t* m = meta + ch * KVC_CHANNEL_META_SIZE;
    m[0] = (uint8_t)code;
    m[1] = (uint8_t)model;
    m[2] = (uint8_t)((uint16_t)(int16_t)ctr & 0xFF);
    m[3] = (uint8_t)((uint16_t)(int16_t)ctr >> 8);
  }
}

struct DevEnc {
  uint32_t x;
  uint8_t* p;  // next byte goes to *--p
  __device__ void put(uint32_t start, uint32_t freq) {
    const uint32_t x_max = ((KVC_RANS_L >> KVC_PROB_BITS) << 8) * freq;
    while (x >= x_max) { *--p = (uint8_t)(x & 0xFF); x >>= 8; }
    x = ((x / freq) << KVC_PROB_BITS) + (x % freq) + start;
  }
};

// One thread per (segment, lane). Lane bytes end at region_end = scratch + (lane+1) * cap.
__global__ void k_encode_lanes(const uint8_t* __restrict__ meta, const int16_t* __restrict__ q, uint32_t segs,
                               uint32_t T, uint32_t C, uint32_t n, uint64_t cap, uint8_t* scratch,
                               uint32_t* lane_len, uint32_t* lane_state, const uint32_t* __restrict__ coded_all,
                               const uint32_t* __restrict__ raw_count) {
  const uint64_t gid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= (uint64_t)segs * kLanes1) return;
  const uint32_t seg = (uint32_t)(gid / kLanes1), j = (uint32_t)(gid % kLanes1);
  if (j >= n) return;
  const DevModels& M = d_models;
  const uint64_t base = (uint64_t)seg * T * C;
  uint8_t* end = scratch + (gid + 1) * cap;
  DevEnc enc{KVC_RANS_L, end};
  const uint32_t* coded = coded_all + (uint64_t)seg * T;
  const uint32_t TC = T - raw_count[seg];
  const uint32_t nch = (C - j + n - 1) / n;
  for (uint32_t ci = nch; ci-- > 0;) {
    const uint32_t c = j + ci * n;
    const uint8_t* m = meta + ((uint64_t)seg * C + c) * KVC_CHANNEL_META_SIZE;
    const uint32_t k = m[1] & KVC_MODEL_INDEX_MASK, lim = M.limit[k];
    const bool delta = m[1] & KVC_MODEL_DELTA_BIT;
    const int32_t ctr = (int16_t)(uint16_t)(m[2] | (m[3] << 8));
    for (uint32_t i = TC; i-- > 0;) {
      const int32_t pred = (delta && i > 0) ? q[base + (uint64_t)coded[i - 1] * C + c] : ctr;
      const uint32_t z = kvc_zigzag(q[base + (uint64_t)coded[i] * C + c] - pred);
      if (z < lim) {
        enc.put(M.cum[k][z], M.freq[k][z]);
      } else {
        enc.put((z >> 8) * KVC_BYPASS_FREQ, KVC_BYPASS_FREQ);
        enc.put((z & 0xFF) * KVC_BYPASS_FREQ, KVC_BYPASS_FREQ);
        enc.put(M.cum[k][lim], M.freq[k][lim]);
      }
    }
  }
  lane_len[gid] = (uint32_t)(end - enc.p);
  lane_state[gid] = enc.x;
}

// Assemble the payload: one block per (segment, lane); lane 0's block also copies the
// segment's channel table, every block writes its lane-table entry.
__global__ void k_gather(const void* __restrict__ src, int dtype, uint32_t T, const uint32_t* __restrict__ raw_count,
                         const uint32_t* __restrict__ raw_idx, const uint8_t* __restrict__ meta, uint32_t C, uint32_t n, uint64_t cap,
                         const uint8_t* __restrict__ scratch, const uint32_t* __restrict__ lane_len,
                         const uint32_t* __restrict__ lane_state, const uint64_t* __restrict__ seg_off,
                         const uint64_t* __restrict__ lane_off, uint8_t* __restrict__ out) {
  const uint32_t seg = blockIdx.x / kLanes1, j = blockIdx.x % kLanes1;
  if (j >= n) return;
  const uint64_t lane = (uint64_t)seg * kLanes1 + j;
  uint8_t* so = out + seg_off[seg];
  const uint32_t R = raw_count[seg], B = kvc_dtype_size(dtype);
  const uint32_t* ridx = raw_idx + (uint64_t)seg * KVC_MAX_RAW_TOKENS;
  if (j == 0) {
    if (threadIdx.x == 0) { so[0] = (uint8_t)R; so[1] = (uint8_t)(R >> 8); }
    for (uint32_t i = threadIdx.x; i < 4 * R; i += blockDim.x) so[2 + i] = (uint8_t)(ridx[i / 4] >> (8 * (i % 4)));
    uint8_t* rows = so + 2 + 4 * R;
    const uint8_t* sb = static_cast<const uint8_t*>(src);
    for (uint64_t e = threadIdx.x; e < (uint64_t)R * C; e += blockDim.x) {  // NaN -> +0, else verbatim
      const uint64_t el = (uint64_t)seg * T * C + (uint64_t)ridx[e / C] * C + e % C;
      const bool nan = kvc_is_nan(kvc_load(src, el, dtype));
      for (uint32_t b = 0; b < B; b++) rows[e * B + b] = nan ? 0 : sb[el * B + b];
    }
  }
  so += 2 + 4ull * R + (uint64_t)R * C * B;
  if (j == 0)
    for (uint64_t i = threadIdx.x; i < (uint64_t)C * KVC_CHANNEL_META_SIZE; i += blockDim.x)
      so[i] = meta[(uint64_t)seg * C * KVC_CHANNEL_META_SIZE + i];
  if (threadIdx.x < 8) {
    const uint32_t v = threadIdx.x < 4 ? lane_len[lane] : lane_state[lane];
    so[(uint64_t)C * KVC_CHANNEL_META_SIZE + 8 * j + threadIdx.x] = (uint8_t)(v >> (8 * (threadIdx.x & 3)));
  }
  const uint32_t len = lane_len[lane];
  const uint8_t* lane_src = scratch + (lane + 1) * cap - len;
  uint8_t* lane_dst = out + lane_off[lane];
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) lane_dst[i] = lane_src[i];
}

// ---- decode ----------------------------------------------------------------------------

__device__ __forceinline__ uint32_t ld32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

__device__ void fail(int* err, int code, uint32_t where) {
  if (atomicCAS(err, 0, code) == 0) { err[1] = (int)where; err[2] = (int)blockIdx.y; }
}

template <int DT>
// grid.y = chunk of the batch (all chunks share shape and dtype).
__global__ void k_decode(const uint8_t* const* __restrict__ bufs, const uint64_t* __restrict__ lens,
                         void* const* __restrict__ dsts, uint64_t payload_off, uint32_t L, uint32_t S, uint32_t T,
                         uint32_t C, int* err) {
  const uint8_t* __restrict__ buf = bufs[blockIdx.y];
  const uint64_t n_buf = lens[blockIdx.y];
  void* __restrict__ dst = dsts[blockIdx.y];
  const uint64_t gid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= (uint64_t)L * S * kLanes1) return;
  const uint32_t seg = (uint32_t)(gid / kLanes1), j = (uint32_t)(gid % kLanes1);
  const uint32_t l = seg / S, s = seg % S;
  const uint32_t n = C < kLanes1 ? C : kLanes1;
  if (j >= n) return;
  const uint8_t* ie = buf + KVC_HEADER_SIZE + 16ull * l;
  const uint64_t loff = (uint64_t)ld32(ie) | ((uint64_t)ld32(ie + 4) << 32);
  const uint32_t lsize = ld32(ie + 8);
  if (loff > n_buf - payload_off || lsize > n_buf - payload_off - loff) { fail(err, kErrLayout, seg); return; }
  const uint8_t* p = buf + payload_off + loff;
  const uint8_t* end = p + lsize;
  const uint32_t B = kvc_dtype_size(DT);
  const uint64_t head = (uint64_t)C * KVC_CHANNEL_META_SIZE + (uint64_t)n * KVC_LANE_ENTRY_SIZE;
  uint32_t R = 0;
  const uint8_t* ridx = p;
  for (uint32_t ss = 0; ss <= s; ss++) {  // walk to segment s
    if (end - p < 2) { fail(err, kErrLayout, seg); return; }
    R = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint64_t raw = 2 + 4ull * R + (uint64_t)R * C * B;
    if (R > KVC_MAX_RAW_TOKENS || R > T || (uint64_t)(end - p) < raw + head) { fail(err, kErrLayout, seg); return; }
    ridx = p + 2;
    p += raw;
    if (ss == s) break;
    const uint8_t* tbl = p + (uint64_t)C * KVC_CHANNEL_META_SIZE;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) total += ld32(tbl + 8 * i);
    if (total > (uint64_t)(end - p) - head) { fail(err, kErrLayout, seg); return; }
    p += head + total;
  }
  const uint64_t base = (uint64_t)seg * T * C;
  {  // raw rows of this lane's channels
    uint32_t next = 0;
    const uint8_t* rows = ridx + 4ull * R;
    for (uint32_t r = 0; r < R; r++) {
      const uint32_t t = ld32(ridx + 4 * r);
      if (t >= T || t < next) { fail(err, kErrMeta, seg); return; }
      next = t + 1;
      for (uint32_t c = j; c < C; c += n)
        for (uint32_t b = 0; b < B; b++)
          ((uint8_t*)dst)[(base + (uint64_t)t * C + c) * B + b] = rows[((uint64_t)r * C + c) * B + b];
    }
  }
  const uint8_t* meta = p;
  const uint8_t* tbl = p + (uint64_t)C * KVC_CHANNEL_META_SIZE;
  const uint8_t* data = p + head;
  uint64_t before = 0, total = 0;
  for (uint32_t i = 0; i < n; i++) {
    const uint32_t len = ld32(tbl + 8 * i);
    if (i < j) before += len;
    total += len;
  }
  if (total > (uint64_t)(end - data)) { fail(err, kErrLayout, seg); return; }
  if (s == S - 1 && j == n - 1 && data + total != end) { fail(err, kErrEnd, seg); return; }
  const uint8_t* lp = data + before;
  const uint8_t* lend = lp + ld32(tbl + 8 * j);
  uint32_t x = ld32(tbl + 8 * j + 4);
  if (x < KVC_RANS_L || x >= (KVC_RANS_L << 8)) { fail(err, kErrLayout, seg); return; }
  const DevModels& M = d_models;
  const uint32_t nch = (C - j + n - 1) / n;
  for (uint32_t ci = 0; ci < nch; ci++) {
    const uint32_t c = j + ci * n;
    const uint8_t* m = meta + (uint64_t)c * KVC_CHANNEL_META_SIZE;
    const uint32_t mb = m[1];
    const int32_t ctr = (int16_t)(uint16_t)(m[2] | (m[3] << 8));
    if ((mb & KVC_MODEL_RESERVED_MASK) || ctr > KVC_QMAX || ctr < -KVC_QMAX) { fail(err, kErrMeta, seg); return; }
    const float step = kvc_step(m[0]);
    const uint32_t k = mb & KVC_MODEL_INDEX_MASK, lim = M.limit[k];
    const bool delta = mb & KVC_MODEL_DELTA_BIT;
    int32_t pred = ctr;
    uint32_t ri = 0;
    for (uint32_t t = 0; t < T; t++) {
      if (ri < R && ld32(ridx + 4 * ri) == t) { ri++; continue; }
      uint32_t slot = x & (KVC_PROB_TOTAL - 1);
      uint32_t z = M.lookup[k][slot];
      x = M.freq[k][z] * (x >> KVC_PROB_BITS) + slot - M.cum[k][z];
      while (x < KVC_RANS_L) {
        if (lp >= lend) { fail(err, kErrStream, seg); return; }
        x = (x << 8) | *lp++;
      }
      if (z == lim) {
        uint32_t b[2];
        for (int i = 0; i < 2; i++) {
          slot = x & (KVC_PROB_TOTAL - 1);
          b[i] = slot / KVC_BYPASS_FREQ;
          x = KVC_BYPASS_FREQ * (x >> KVC_PROB_BITS) + slot - b[i] * KVC_BYPASS_FREQ;
          while (x < KVC_RANS_L) {
            if (lp >= lend) { fail(err, kErrStream, seg); return; }
            x = (x << 8) | *lp++;
          }
        }
        z = b[0] | (b[1] << 8);
      }
      const int32_t v = pred + kvc_unzigzag(z);
      if (v > KVC_QMAX || v < -KVC_QMAX) { fail(err, kErrValue, seg); return; }
      if (delta) pred = v;
      const float f = kvc_dequantize(v, step);
      const uint64_t o = base + (uint64_t)t * C + c;
      if (DT == KVC_DTYPE_F16) ((uint16_t*)dst)[o] = kvc_float_to_half(f);
      else if (DT == KVC_DTYPE_BF16) ((uint16_t*)dst)[o] = kvc_float_to_bf16(f);
      else ((float*)dst)[o] = f;
    }
  }
  if (!(x == KVC_RANS_L && lp == lend)) fail(err, kErrEnd, seg);
}

}  // namespace

KVS_API int kvs_cuda_codec_encode(const void* dev_src, int dtype, int layout, uint32_t L, uint32_t T, uint32_t H, uint32_t D,
                    int level, void* stream, uint8_t* dst, uint64_t dst_cap, uint64_t* out_size, char* err,
                    size_t err_len) {
  Error e;
  Header h;
  if (level <= KVC_LEVEL_LOSSLESS || level >= KVC_NUM_LEVELS) {
    e.fail("GPU encode supports the lossy levels 1..3, got %d (encode lossless on the CPU)", level);
    return report(KVS_EINVAL, e, err, err_len);
  }
  if (dtype < 1 || dtype > 3 || layout < 1 || layout > 2) {
    e.fail("bad dtype %d or layout %d", dtype, layout);
    return report(KVS_EINVAL, e, err, err_len);
  }
  h.level = (uint8_t)level; h.dtype = (uint8_t)dtype; h.layout = (uint8_t)layout;
  h.layers = L; h.tokens = T; h.heads = H; h.head_dim = D;
  if (!kvc::check_shape(h, e)) return report(KVS_EINVAL, e, err, err_len);
  if (!init_models(e)) return report(KVS_EINTERNAL, e, err, err_len);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint32_t S = h.segments(), C = (uint32_t)h.channels(), segs = L * S;
  const uint32_t n = C < kLanes1 ? C : kLanes1;
  const uint64_t elems = h.elements();
  const uint64_t cap = (uint64_t)((C + n - 1) / n) * T * 6 + 16;
  const kvc_level_params& lp = kvc_level_defaults(level);
  Policy pol;
  for (int a = 0; a < 2; a++) {
    pol.w[a] = lp.w[a];
    for (int b = 0; b < 3; b++) pol.off[a][b] = lp.off[a][b];
  }
  DevBuffers mem(st);
  uint8_t *meta, *chan_const, *scratch, *out;
  int16_t* q;
  int64_t* chan_lc;
  int32_t* chan_qlmax;
  uint32_t *lane_len, *lane_state, *coded, *raw_count, *raw_idx;
  int64_t* tok_tm;
  uint64_t *seg_off, *lane_off;
  const uint64_t nlanes = (uint64_t)segs * kLanes1;
  if (!mem.alloc(&meta, (uint64_t)segs * C * KVC_CHANNEL_META_SIZE, e) || !mem.alloc(&q, elems * 2, e) ||
      !mem.alloc(&chan_lc, (uint64_t)segs * C * 8, e) || !mem.alloc(&chan_qlmax, (uint64_t)segs * C * 4, e) ||
      !mem.alloc(&chan_const, (uint64_t)segs * C, e) || !mem.alloc(&scratch, nlanes * cap, e) ||
      !mem.alloc(&lane_len, nlanes * 4, e) || !mem.alloc(&lane_state, nlanes * 4, e) ||
      !mem.alloc(&seg_off, (uint64_t)segs * 8, e) || !mem.alloc(&lane_off, nlanes * 8, e) ||
      !mem.alloc(&tok_tm, (uint64_t)segs * T * 8, e) || !mem.alloc(&coded, (uint64_t)segs * T * 4, e) ||
      !mem.alloc(&raw_count, (uint64_t)segs * 4, e) || !mem.alloc(&raw_idx, (uint64_t)segs * KVC_MAX_RAW_TOKENS * 4, e))
    return report(KVS_EINTERNAL, e, err, err_len);
  k_plan<<<segs, kPlanThreads, 0, st>>>(dev_src, dtype, L, S, T, C, pol, meta, q, chan_lc, chan_qlmax, chan_const,
                                         tok_tm, coded, raw_count, raw_idx);
  k_encode_lanes<<<(unsigned)((nlanes + 127) / 128), 128, 0, st>>>(meta, q, segs, T, C, n, cap, scratch, lane_len,
                                                                   lane_state, coded, raw_count);
  std::vector<uint32_t> hl(nlanes), hr(segs);
  if (!cuda_ok(cudaGetLastError(), e, "encode launch") || !cuda_ok(cudaMemcpyAsync(hl.data(), lane_len, nlanes * 4, cudaMemcpyDeviceToHost, st), e, "copy lane sizes") ||
      !cuda_ok(cudaMemcpyAsync(hr.data(), raw_count, segs * 4ull, cudaMemcpyDeviceToHost, st), e, "copy raw counts") ||
      !cuda_ok(cudaStreamSynchronize(st), e, "encode kernels"))
    return report(KVS_EINTERNAL, e, err, err_len);
  // payload layout
  std::vector<uint64_t> hs(segs), hlo(nlanes, 0);
  std::vector<uint32_t> layer_size(L, 0);
  uint64_t off = 0;
  for (uint32_t sg = 0; sg < segs; sg++) {
    hs[sg] = off;
    uint64_t o = off + 2 + 4ull * hr[sg] + (uint64_t)hr[sg] * C * kvc_dtype_size(dtype) +
                 (uint64_t)C * KVC_CHANNEL_META_SIZE + (uint64_t)n * KVC_LANE_ENTRY_SIZE;
    for (uint32_t j = 0; j < n; j++) { hlo[(uint64_t)sg * kLanes1 + j] = o; o += hl[(uint64_t)sg * kLanes1 + j]; }
    if (o - off + layer_size[sg / S] > 0xFFFFFFFFull) {
      e.fail("layer encodes to more than 4 GiB");
      return report(KVS_EINVAL, e, err, err_len);
    }
    layer_size[sg / S] += (uint32_t)(o - off);
    off = o;
  }
  h.payload_size = off;
  const uint64_t total = h.payload_offset() + off;
  if (out_size) *out_size = total;
  if (dst == nullptr || dst_cap < total) {
    e.fail("output buffer of %llu bytes too small, need %llu", (unsigned long long)dst_cap, (unsigned long long)total);
    return report(KVS_ENOSPC, e, err, err_len);
  }
  if (!mem.alloc(&out, off, e) ||
      !cuda_ok(cudaMemcpyAsync(seg_off, hs.data(), segs * 8ull, cudaMemcpyHostToDevice, st), e, "copy offsets") ||
      !cuda_ok(cudaMemcpyAsync(lane_off, hlo.data(), nlanes * 8, cudaMemcpyHostToDevice, st), e, "copy offsets"))
    return report(KVS_EINTERNAL, e, err, err_len);
  k_gather<<<(unsigned)nlanes, 128, 0, st>>>(dev_src, dtype, T, raw_count, raw_idx, meta, C, n, cap, scratch, lane_len, lane_state, seg_off, lane_off, out);
  uint8_t* payload = dst + h.payload_offset();
  if (!cuda_ok(cudaMemcpyAsync(payload, out, off, cudaMemcpyDeviceToHost, st), e, "copy payload") ||
      !cuda_ok(cudaStreamSynchronize(st), e, "gather"))
    return report(KVS_EINTERNAL, e, err, err_len);
  std::vector<uint32_t> crcs(L);
  uint64_t lo = 0;
  for (uint32_t l = 0; l < L; l++) { crcs[l] = kvc::crc32c(payload + lo, layer_size[l]); lo += layer_size[l]; }
  kvc::write_header_index(h, layer_size.data(), crcs.data(), dst);
  return KVS_OK;
}

KVS_API int kvs_cuda_codec_decode_batch(uint32_t count, const uint8_t* const* host_heads, const uint64_t* host_lens,
                          const uint8_t* const* dev_bufs, const uint64_t* lens, void* const* dev_dsts,
                          uint64_t dst_bytes_each, void* stream, int verify_crc, char* err, size_t err_len) {
  Error e;
  if (count == 0) return KVS_OK;
  if (count > 65535 || !host_heads || !host_lens || !dev_bufs || !lens || !dev_dsts) {
    e.fail("batch of %u chunks: 1..65535 chunks and non-null arrays required", count);
    return report(KVS_EINVAL, e, err, err_len);
  }
  for (uint32_t i = 0; i < count; i++)
    if (dev_bufs[i] == nullptr || dev_dsts[i] == nullptr) {
      e.fail("chunk %u: null device pointer", i);
      return report(KVS_EINVAL, e, err, err_len);
    }
  Header first;
  const int pc = kvc_cuda::parse_batch(count, host_heads, host_lens, lens, verify_crc != 0, first, e);
  if (pc != KVS_OK) return report(pc, e, err, err_len);
  const Header& h = first;
  const uint64_t want = h.elements() * kvc_dtype_size(h.dtype);
  if (dst_bytes_each != want) {
    e.fail("destination has %llu bytes, chunk needs %llu", (unsigned long long)dst_bytes_each, (unsigned long long)want);
    return report(KVS_EINVAL, e, err, err_len);
  }
  int variant = kvc_cuda::decode_variant();
  if (variant == kvc_cuda::kDecoderFirst && h.lanes != kLanes1) variant = kvc_cuda::kDecoderDefault;
  if (variant == kvc_cuda::kDecoderFirst ? !init_models(e) : !kvc_cuda::ensure_decode_models(e))
    return report(KVS_EINTERNAL, e, err, err_len);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  DevBuffers mem(st);
  int* derr;
  uint64_t* args;  // [bufs | lens | dsts]
  std::vector<uint64_t> hargs(3ull * count);
  for (uint32_t i = 0; i < count; i++) {
    hargs[i] = (uint64_t)(uintptr_t)dev_bufs[i];
    hargs[count + i] = lens[i];
    hargs[2ull * count + i] = (uint64_t)(uintptr_t)dev_dsts[i];
  }
  if (!mem.alloc(&derr, 16, e) || !mem.alloc(&args, 24ull * count, e) ||
      !cuda_ok(cudaMemsetAsync(derr, 0, 16, st), e, "memset") ||
      !cuda_ok(cudaMemcpyAsync(args, hargs.data(), 24ull * count, cudaMemcpyHostToDevice, st), e, "copy batch"))
    return report(KVS_EINTERNAL, e, err, err_len);
  const uint8_t* const* d_bufs = reinterpret_cast<const uint8_t* const*>(args);
  const uint64_t* d_lens = args + count;
  void* const* d_dsts = reinterpret_cast<void* const*>(args + 2ull * count);
  const uint32_t S = h.segments(), C = (uint32_t)h.channels();
  const uint64_t threads = (uint64_t)h.layers * S * kLanes1;
  const dim3 grid((unsigned)((threads + 127) / 128), count);
  const uint64_t po = h.payload_offset();
  if (variant != kvc_cuda::kDecoderFirst) {
    if (!kvc_cuda::enqueue_decode(variant, h, count, 0, d_bufs, d_lens, d_dsts, derr, st, e))
      return report(KVS_EINTERNAL, e, err, err_len);
  } else if (h.dtype == KVC_DTYPE_F16)
    k_decode<KVC_DTYPE_F16><<<grid, 128, 0, st>>>(d_bufs, d_lens, d_dsts, po, h.layers, S, h.tokens, C, derr);
  else if (h.dtype == KVC_DTYPE_BF16)
    k_decode<KVC_DTYPE_BF16><<<grid, 128, 0, st>>>(d_bufs, d_lens, d_dsts, po, h.layers, S, h.tokens, C, derr);
  else
    k_decode<KVC_DTYPE_F32><<<grid, 128, 0, st>>>(d_bufs, d_lens, d_dsts, po, h.layers, S, h.tokens, C, derr);
  int herr[4] = {0, 0, 0, 0};
  if (!cuda_ok(cudaGetLastError(), e, "decode launch") ||
      !cuda_ok(cudaMemcpyAsync(herr, derr, 16, cudaMemcpyDeviceToHost, st), e, "copy error flag") ||
      !cuda_ok(cudaStreamSynchronize(st), e, "decode kernel"))
    return report(KVS_EINTERNAL, e, err, err_len);
  if (herr[0] != 0) {
    e.fail("corrupt lossy bitstream (chunk %d, layer %u segment %u): %s", herr[2], (unsigned)herr[1] / S,
           (unsigned)herr[1] % S, dev_error_text(herr[0]));
    return report(KVS_ECORRUPT, e, err, err_len);
  }
  return KVS_OK;
}

KVS_API int kvs_cuda_codec_decode(const uint8_t* host_head, uint64_t host_n, const uint8_t* dev_buf, uint64_t n, void* dev_dst,
                    uint64_t dst_bytes, void* stream, int verify_crc, char* err, size_t err_len) {
  return kvs_cuda_codec_decode_batch(1, &host_head, &host_n, &dev_buf, &n, &dev_dst, dst_bytes, stream, verify_crc, err,
                               err_len);
}
