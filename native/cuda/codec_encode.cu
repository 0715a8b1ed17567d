// Batched GPU encoder of the lossy levels, bit-exact with native/src/codec (CPU) and with the
// one-chunk encoder of codec.cu (kvs_cuda_codec_encode, kept beside it).
//
// One pass of kernels for a whole batch of chunks of one shape:
//   k_plan_b     one block per segment of every chunk: integer statistics (token means by
//                warp reductions, channel statistics one thread per channel, the coded-token
//                list in shared memory), step codes, quantisation, centre / predictor / model
//                choice, and the zigzag symbols, laid out [segment][channel / lanes][token][lane]
//                so that both the writes here and the lane reads below are coalesced;
//   k_lanes_b    one thread per rANS lane: symbols prefetched 8 ahead, models with exact
//                reciprocals (no integer division) in shared memory, renormalisation bytes
//                written without a branch, backwards into the lane's scratch region;
//   (host)       one synchronisation for every lane size, the payload layout of every chunk;
//   k_gather_b   the payloads assembled on the device, layer CRC32C on the GPU
//                (kvs_cuda_crc32c_batch), one copy per chunk to the host; headers on the host.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include <vector>

#include "codec/levels.h"
#include "codec_shared.cuh"
#include "kvstore.h"

namespace {

using kvc::Error;
using kvc::Header;
using kvc::report;
using namespace kvc_cuda;

// The models as the encoder reads them: ent = cum | freq << 16 and rcp = the exact reciprocal
// of freq for 31-bit numerators (Granlund-Montgomery: m = ceil(2^(31+l) / f), l = ceil(log2 f),
// then x / f = (x * m) >> (31 + l) for every x < 2^31; rANS states are < 2^31).
struct alignas(16) EncModels {
  uint32_t ent[KVC_MODEL_FREQ_TOTAL];
  uint32_t rcp[KVC_MODEL_FREQ_TOTAL];
  uint16_t moff[KVC_NUM_MODELS];
  uint16_t lim[KVC_NUM_MODELS];
};
static_assert(sizeof(EncModels) % 16 == 0, "copied to shared memory in 16-byte words");

__device__ EncModels d_em;
__constant__ uint32_t d_thr_enc[KVC_NUM_MODELS];
std::mutex g_enc_mu;
// kvs_cuda_codec_set_encoder: 0 = k_plan_b (global-memory statistics), 1 = k_plan_tile where it fits.
std::atomic<int> g_plan_variant{1};  // the tile: 1.3x on SmolLM2 chunks (H100, 2026-12-06)
bool g_enc_done[64] = {false};

constexpr int kPlanThreadsMin = 256;   // small segments: 8 warps share the token pass
constexpr int kPlanThreadsMax = 1024;  // one thread per channel up to 1024 channels
constexpr uint32_t kPlanSmemTokens = 2048;  // coded-token list in shared memory up to this
// k_plan_tile: a segment's 2-byte values staged in shared memory (with its token means and
// coded-token list) up to this many bytes: SmolLM2's 256 x 192 segment takes 99 KB, two blocks per SM.
constexpr uint32_t kPlanTileMaxBytes = 110u << 10;
constexpr int kLaneThreads = 128;
constexpr int kLanePrefetch = 8;  // symbols in flight per lane

__host__ __device__ inline uint32_t ceil_log2(uint32_t f) {  // f >= 1
  uint32_t l = 0;
  while ((1u << l) < f) l++;
  return l;
}

void build_enc_models(EncModels& m) {
  memset(&m, 0, sizeof m);
  for (int k = 0; k < KVC_NUM_MODELS; k++) {
    const uint32_t n = kvc_model_limit[k] + 1u, off = kvc_model_offset[k];
    m.moff[k] = (uint16_t)off;
    m.lim[k] = kvc_model_limit[k];
    uint32_t c = 0;
    for (uint32_t z = 0; z < n; z++) {
      const uint32_t f = kvc_model_freq[off + z], l = ceil_log2(f);
      m.ent[off + z] = c | (f << 16);
      m.rcp[off + z] = (uint32_t)(((1ull << (31 + l)) + f - 1) / f);
      c += f;
    }
  }
}

struct Policy {
  int32_t off[2][3];
  int32_t w[2];
};

struct PlanArgs {
  const uint64_t* srcs;  // device array: chunk pointers
  int dtype;
  uint32_t L, S, T, C, n, nch;  // nch: channels per lane, rounded up (C / n)
  Policy pol;
  uint8_t* meta;        // [segs][C][4]
  int16_t* q;           // [segs][T][C]
  uint16_t* sym;        // [segs][nch][T][n]: channel c = j + ci * n of lane j, coded token i
  int64_t* chan_lc;
  int32_t* chan_qlmax;
  uint8_t* chan_const;
  int64_t* tok_tm;      // [segs][T]
  uint32_t* coded_all;  // [segs][T]
  uint32_t* raw_count;  // [segs]
  uint32_t* raw_idx;    // [segs][16]
};

__device__ __forceinline__ const void* chunk_src(const PlanArgs& a, uint32_t g) {
  return reinterpret_cast<const void*>(a.srcs[g / (a.L * a.S)]);
}

// One block per segment g of the batch (chunk g / (L*S)); the policy of codec.cu's k_plan.
__global__ void __launch_bounds__(kPlanThreadsMax) k_plan_b(const PlanArgs a) {
  const uint32_t g = blockIdx.x, spc = a.L * a.S, seg = g % spc, l = seg / a.S, s = seg % a.S;
  const uint32_t T = a.T, C = a.C, n = a.n;
  const int dtype = a.dtype;
  const void* src = chunk_src(a, g);
  const uint64_t base = (uint64_t)seg * T * C;  // in the chunk
  const uint64_t qbase = (uint64_t)g * T * C;   // in the batch scratch
  int64_t* tm = a.tok_tm + (uint64_t)g * T;
  __shared__ uint32_t s_coded[kPlanSmemTokens];
  const uint32_t* coded = T <= kPlanSmemTokens ? s_coded : a.coded_all + (uint64_t)g * T;
  __shared__ long long sum_bits;
  __shared__ uint32_t tc_shared;
  if (threadIdx.x == 0) sum_bits = 0;
  __syncthreads();
  // token means: one warp per token, lanes over channels (coalesced), exact integer sums
  const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31u, nw = blockDim.x >> 5;
  long long local = 0;
  for (uint32_t t = warp; t < T; t += nw) {
    long long sq = 0;
    for (uint32_t c = lane; c < C; c += 32) sq += kvc_qlog(kvc_sanitize(kvc_load(src, base + (uint64_t)t * C + c, dtype)));
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xFFFFFFFFu, sq, o);
    if (lane == 0) {
      tm[t] = kvc_floordiv(sq, C);
      local += tm[t];
    }
  }
  if (lane == 0) atomicAdd((unsigned long long*)&sum_bits, (unsigned long long)local);  // exact, order free
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t mean = kvc_floordiv((int64_t)sum_bits, T);
    uint32_t* cl = T <= kPlanSmemTokens ? s_coded : a.coded_all + (uint64_t)g * T;
    uint32_t r = 0, tc = 0;
    for (uint32_t t = 0; t < T; t++) {
      const bool raw = r < KVC_MAX_RAW_TOKENS &&
                       (tm[t] - mean >= KVC_RAW_TOKEN_DEVIATION || mean - tm[t] >= KVC_RAW_TOKEN_DEVIATION);
      if (raw) a.raw_idx[g * KVC_MAX_RAW_TOKENS + r++] = t;
      else cl[tc++] = t;
    }
    a.raw_count[g] = r;
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
    uint32_t diff = 0;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) {
      const float v = kvc_sanitize(kvc_load(src, base + (uint64_t)coded[i] * C + c, dtype));
      diff |= kvc_f2u(v) ^ first;
      const int32_t ql = kvc_qlog(v);
      sum_ql += ql;
      qlmax = ql > qlmax ? ql : qlmax;
    }
    const int64_t lc = kvc_floordiv(sum_ql, TD);
    a.chan_lc[(uint64_t)g * C + c] = lc;
    a.chan_qlmax[(uint64_t)g * C + c] = qlmax;
    a.chan_const[(uint64_t)g * C + c] = diff == 0;
    local += lc;
  }
  atomicAdd((unsigned long long*)&sum_bits, (unsigned long long)local);
  __syncthreads();
  const int64_t lbar = kvc_floordiv((int64_t)sum_bits, C);
  const int grp = kvc_layer_group(l, a.L);
  for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
    const uint64_t ch = (uint64_t)g * C + c;
    const uint32_t code =
        kvc_step_code(a.chan_lc[ch], lbar, a.chan_qlmax[ch], a.pol.off[s][grp], a.pol.w[s], a.chan_const[ch] != 0);
    const float step = kvc_step(code);
    int64_t sum_q = 0;
    uint64_t cost_d = 0;  // |q_i - q_(i-1)| for i >= 1; the first token's term needs the centre
    int32_t prev = 0, q0 = 0;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) {
      const uint64_t t = coded[i];
      const int32_t v = kvc_quantize(kvc_sanitize(kvc_load(src, base + t * C + c, dtype)), step);
      a.q[qbase + t * C + c] = (int16_t)v;
      sum_q += v;
      if (i) cost_d += (uint64_t)abs(v - prev);
      else q0 = v;
      prev = v;
    }
    const int32_t ctr = kvc_center(sum_q, TD);
    if (TC) cost_d += (uint64_t)abs(q0 - ctr);
    uint64_t cost_c = 0;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) cost_c += (uint64_t)abs((int32_t)a.q[qbase + (uint64_t)coded[i] * C + c] - ctr);
    const bool delta = cost_d < cost_c;
    const uint32_t model =
        kvc_choose_model(delta ? cost_d : cost_c, TD, d_thr_enc, KVC_NUM_MODELS) | (delta ? KVC_MODEL_DELTA_BIT : 0u);
    uint8_t* m = a.meta + ch * KVC_CHANNEL_META_SIZE;
    m[0] = (uint8_t)code;
    m[1] = (uint8_t)model;
    m[2] = (uint8_t)((uint16_t)(int16_t)ctr & 0xFF);
    m[3] = (uint8_t)((uint16_t)(int16_t)ctr >> 8);
    // this channel's symbols: lane c % n, row c / n; consecutive channels -> consecutive lanes
    uint16_t* out = a.sym + ((uint64_t)g * a.nch + c / n) * T * n + c % n;
    prev = ctr;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) {
      const int32_t v = a.q[qbase + (uint64_t)coded[i] * C + c];
      out[(uint64_t)i * n] = (uint16_t)kvc_zigzag(v - (delta ? prev : ctr));
      prev = v;
    }
  }
}

// The statistics pass from shared memory (kvs_cuda_codec_set_encoder 1): the same policy and
// the same integer arithmetic as k_plan_b, on a copy of the segment read once from global memory
// with 16-byte loads (k_plan_b reads every value three times and its quantised values twice more,
// one 2-byte load per thread and token: latency-bound). The quantised values of coded tokens
// overwrite their inputs in place (each channel's column belongs to one thread); raw tokens'
// values are left as they were (the gather copies raw rows from the source). fp16 / bf16 only.
// Dynamic shared memory: [tile: T*C u16, rounded to 16 bytes][token means: T x i64][coded: T x u32].
template <int DT>
__device__ __forceinline__ float tile_val(uint16_t u) {
  return DT == KVC_DTYPE_F16 ? __half2float(__ushort_as_half(u)) : kvc_bf16_to_float(u);
}

template <int DT>
__global__ void __launch_bounds__(kPlanThreadsMax) k_plan_tile(const PlanArgs a) {
  extern __shared__ uint4 s_dyn[];
  const uint32_t g = blockIdx.x, spc = a.L * a.S, seg = g % spc, l = seg / a.S, s = seg % a.S;
  const uint32_t T = a.T, C = a.C, n = a.n, elems = T * C;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(chunk_src(a, g)) + (uint64_t)seg * elems;
  uint16_t* tile = reinterpret_cast<uint16_t*>(s_dyn);
  int16_t* qt = reinterpret_cast<int16_t*>(s_dyn);
  int64_t* tm = reinterpret_cast<int64_t*>(reinterpret_cast<uint8_t*>(s_dyn) + ((uint64_t)elems * 2 + 15) / 16 * 16);
  uint32_t* coded = reinterpret_cast<uint32_t*>(tm + T);
  __shared__ long long sum_bits;
  __shared__ uint32_t tc_shared;
  if (threadIdx.x == 0) sum_bits = 0;
  if (((uintptr_t)src & 15u) == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    const uint32_t n4 = elems / 8;
#pragma unroll 4
    for (uint32_t i = threadIdx.x; i < n4; i += blockDim.x) s_dyn[i] = __ldg(s4 + i);
    for (uint32_t i = n4 * 8 + threadIdx.x; i < elems; i += blockDim.x) tile[i] = src[i];
  } else {
    for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x) tile[i] = src[i];
  }
  __syncthreads();
  const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31u, nw = blockDim.x >> 5;
  long long local = 0;
  for (uint32_t t = warp; t < T; t += nw) {
    long long sq = 0;
    for (uint32_t c = lane; c < C; c += 32) sq += kvc_qlog(kvc_sanitize(tile_val<DT>(tile[t * C + c])));
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xFFFFFFFFu, sq, o);
    if (lane == 0) {
      tm[t] = kvc_floordiv(sq, C);
      local += tm[t];
    }
  }
  if (lane == 0) atomicAdd((unsigned long long*)&sum_bits, (unsigned long long)local);
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t mean = kvc_floordiv((int64_t)sum_bits, T);
    uint32_t r = 0, tc = 0;
    for (uint32_t t = 0; t < T; t++) {
      const bool raw = r < KVC_MAX_RAW_TOKENS &&
                       (tm[t] - mean >= KVC_RAW_TOKEN_DEVIATION || mean - tm[t] >= KVC_RAW_TOKEN_DEVIATION);
      if (raw) a.raw_idx[g * KVC_MAX_RAW_TOKENS + r++] = t;
      else coded[tc++] = t;
    }
    a.raw_count[g] = r;
    tc_shared = tc;
    sum_bits = 0;
  }
  __syncthreads();
  const uint32_t TC = tc_shared, TD = TC ? TC : 1;
  local = 0;
  for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
    int64_t sum_ql = 0;
    int32_t qlmax = KVC_QL_FLOOR;
    const uint32_t first = TC ? kvc_f2u(kvc_sanitize(tile_val<DT>(tile[coded[0] * C + c]))) : 0;
    uint32_t diff = 0;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) {
      const float v = kvc_sanitize(tile_val<DT>(tile[coded[i] * C + c]));
      diff |= kvc_f2u(v) ^ first;
      const int32_t ql = kvc_qlog(v);
      sum_ql += ql;
      qlmax = ql > qlmax ? ql : qlmax;
    }
    const int64_t lc = kvc_floordiv(sum_ql, TD);
    a.chan_lc[(uint64_t)g * C + c] = lc;
    a.chan_qlmax[(uint64_t)g * C + c] = qlmax;
    a.chan_const[(uint64_t)g * C + c] = diff == 0;
    local += lc;
  }
  atomicAdd((unsigned long long*)&sum_bits, (unsigned long long)local);
  __syncthreads();
  const int64_t lbar = kvc_floordiv((int64_t)sum_bits, C);
  const int grp = kvc_layer_group(l, a.L);
  for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
    const uint64_t ch = (uint64_t)g * C + c;
    const uint32_t code =
        kvc_step_code(a.chan_lc[ch], lbar, a.chan_qlmax[ch], a.pol.off[s][grp], a.pol.w[s], a.chan_const[ch] != 0);
    const float step = kvc_step(code);
    int64_t sum_q = 0;
    uint64_t cost_d = 0;
    int32_t prev = 0, q0 = 0;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) {
      const uint32_t o = coded[i] * C + c;
      const int32_t v = kvc_quantize(kvc_sanitize(tile_val<DT>(tile[o])), step);
      qt[o] = (int16_t)v;   // in place: this thread's column, read below only as q
      sum_q += v;
      if (i) cost_d += (uint64_t)abs(v - prev);
      else q0 = v;
      prev = v;
    }
    const int32_t ctr = kvc_center(sum_q, TD);
    if (TC) cost_d += (uint64_t)abs(q0 - ctr);
    uint64_t cost_c = 0;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) cost_c += (uint64_t)abs((int32_t)qt[coded[i] * C + c] - ctr);
    const bool delta = cost_d < cost_c;
    const uint32_t model =
        kvc_choose_model(delta ? cost_d : cost_c, TD, d_thr_enc, KVC_NUM_MODELS) | (delta ? KVC_MODEL_DELTA_BIT : 0u);
    uint8_t* m = a.meta + ch * KVC_CHANNEL_META_SIZE;
    m[0] = (uint8_t)code;
    m[1] = (uint8_t)model;
    m[2] = (uint8_t)((uint16_t)(int16_t)ctr & 0xFF);
    m[3] = (uint8_t)((uint16_t)(int16_t)ctr >> 8);
    uint16_t* out = a.sym + ((uint64_t)g * a.nch + c / n) * T * n + c % n;
    prev = ctr;
#pragma unroll 8
    for (uint32_t i = 0; i < TC; i++) {
      const int32_t v = qt[coded[i] * C + c];
      out[(uint64_t)i * n] = (uint16_t)kvc_zigzag(v - (delta ? prev : ctr));
      prev = v;
    }
  }
}

// Dynamic shared memory of k_plan_tile for a segment of T tokens x C channels.
inline uint64_t plan_tile_bytes(uint32_t T, uint32_t C) { return ((uint64_t)T * C * 2 + 15) / 16 * 16 + 12ull * T; }

struct Enc {
  uint32_t x;
  uint8_t* p;  // next byte goes to *--p
  // Emits the 0, 1 or 2 bytes that bring x under x_max (x < 2^31: at most two), no branch.
  __device__ __forceinline__ void emit(uint32_t x_max) {
    const uint32_t nb = (x >= x_max) + ((x >> 8) >= x_max);
    if (nb >= 1) p[-1] = (uint8_t)x;
    if (nb == 2) p[-2] = (uint8_t)(x >> 8);
    p -= nb;
    x >>= 8 * nb;
  }
  __device__ __forceinline__ void put(uint32_t e, uint32_t rcp) {  // e = cum | freq << 16
    const uint32_t freq = e >> 16, start = e & 0xFFFFu;
    emit(((KVC_RANS_L >> KVC_PROB_BITS) << 8) * freq);
    const uint32_t l = 32 - __clz(freq - 1);  // ceil(log2 freq); 0 for freq 1
    const uint32_t qt = (uint32_t)(((uint64_t)x * rcp) >> (31 + l));
    x = (qt << KVC_PROB_BITS) + (x - qt * freq) + start;
  }
  __device__ __forceinline__ void put_bypass(uint32_t b) {  // freq 16, cum 16 b
    emit(((KVC_RANS_L >> KVC_PROB_BITS) << 8) * KVC_BYPASS_FREQ);
    x = ((x >> 4) << KVC_PROB_BITS) + (x & (KVC_BYPASS_FREQ - 1)) + b * KVC_BYPASS_FREQ;
  }
};
static_assert(KVC_BYPASS_FREQ == 16, "put_bypass divides by shifting");

struct LaneArgs {
  const uint8_t* meta;
  const uint16_t* sym;
  uint32_t segs, T, C, n, nch;
  uint64_t cap;
  uint8_t* scratch;
  uint32_t* lane_len;
  uint32_t* lane_state;
  const uint32_t* raw_count;
};

// One thread per (segment, lane); lane bytes end at scratch + (lane + 1) * cap. Symbols are
// coded in reverse (channel c = j + ci * n from the last, coded token i from the last).
__global__ void __launch_bounds__(kLaneThreads) k_lanes_b(const LaneArgs a) {
  extern __shared__ uint4 sm_raw[];
  EncModels& sm = *reinterpret_cast<EncModels*>(sm_raw);
  {
    const uint4* src = reinterpret_cast<const uint4*>(&d_em);
    for (uint32_t i = threadIdx.x; i < sizeof(EncModels) / 16; i += blockDim.x) sm_raw[i] = src[i];
    __syncthreads();
  }
  const uint64_t gid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (gid >= (uint64_t)a.segs * a.n) return;
  const uint32_t g = (uint32_t)(gid / a.n), j = (uint32_t)(gid % a.n);
  const uint32_t C = a.C, n = a.n, T = a.T, TC = a.T - a.raw_count[g];
  const int32_t nch = (int32_t)((C - j + n - 1) / n);
  uint8_t* end = a.scratch + (gid + 1) * a.cap;
  Enc enc{KVC_RANS_L, end};
  const uint32_t total = (uint32_t)nch * TC;
  if (total) {
    const uint16_t* S = a.sym + (uint64_t)g * a.nch * T * n + j;  // (ci, i) at S[(ci * T + i) * n]
    int32_t lci = nch - 1, li = (int32_t)TC - 1;                   // load cursor
    uint32_t zn[kLanePrefetch];
#pragma unroll
    for (int u = 0; u < kLanePrefetch; u++) {
      zn[u] = lci >= 0 ? S[((uint64_t)lci * T + li) * n] : 0u;
      if (li == 0) { lci--; li = (int32_t)TC - 1; } else { li--; }
    }
    int32_t pci = nch - 1, pi = (int32_t)TC - 1;  // coding cursor
    uint32_t k = a.meta[((uint64_t)g * C + j + pci * n) * KVC_CHANNEL_META_SIZE + 1] & KVC_MODEL_INDEX_MASK;
    uint32_t moff = sm.moff[k], lim = sm.lim[k];
    for (uint32_t done = 0; done < total; done += kLanePrefetch) {
      uint32_t zc[kLanePrefetch];
#pragma unroll
      for (int u = 0; u < kLanePrefetch; u++) {
        zc[u] = zn[u];
        zn[u] = lci >= 0 ? S[((uint64_t)lci * T + li) * n] : 0u;
        if (li == 0) { lci--; li = (int32_t)TC - 1; } else { li--; }
      }
#pragma unroll
      for (int u = 0; u < kLanePrefetch; u++) {
        if (done + u >= total) break;
        const uint32_t z = zc[u];
        if (z < lim) {
          enc.put(sm.ent[moff + z], sm.rcp[moff + z]);
        } else {
          enc.put_bypass(z >> 8);
          enc.put_bypass(z & 0xFF);
          enc.put(sm.ent[moff + lim], sm.rcp[moff + lim]);
        }
        if (pi == 0) {
          pci--;
          pi = (int32_t)TC - 1;
          if (pci >= 0) {
            k = a.meta[((uint64_t)g * C + j + pci * n) * KVC_CHANNEL_META_SIZE + 1] & KVC_MODEL_INDEX_MASK;
            moff = sm.moff[k];
            lim = sm.lim[k];
          }
        } else {
          pi--;
        }
      }
    }
  }
  a.lane_len[gid] = (uint32_t)(end - enc.p);
  a.lane_state[gid] = enc.x;
}

struct GatherArgs {
  const uint64_t* srcs;
  int dtype;
  uint32_t L, S, T, C, n;
  uint64_t cap;
  const uint32_t* raw_count;
  const uint32_t* raw_idx;
  const uint8_t* meta;
  const uint8_t* scratch;
  const uint32_t* lane_len;
  const uint32_t* lane_state;
  const uint64_t* seg_off;   // [segs]: offset in `out`
  const uint64_t* lane_off;  // [segs][n]
  uint8_t* out;
};

// One block per (segment, lane) of the batch, as codec.cu's k_gather.
__global__ void k_gather_b(const GatherArgs a) {
  const uint32_t g = blockIdx.x / a.n, j = blockIdx.x % a.n;
  const uint32_t C = a.C, T = a.T, spc = a.L * a.S;
  const void* src = reinterpret_cast<const void*>(a.srcs[g / spc]);
  const uint64_t lane = (uint64_t)g * a.n + j;
  uint8_t* so = a.out + a.seg_off[g];
  const uint32_t R = a.raw_count[g], B = kvc_dtype_size(a.dtype);
  const uint32_t* ridx = a.raw_idx + (uint64_t)g * KVC_MAX_RAW_TOKENS;
  if (j == 0) {
    if (threadIdx.x == 0) { so[0] = (uint8_t)R; so[1] = (uint8_t)(R >> 8); }
    for (uint32_t i = threadIdx.x; i < 4 * R; i += blockDim.x) so[2 + i] = (uint8_t)(ridx[i / 4] >> (8 * (i % 4)));
    uint8_t* rows = so + 2 + 4 * R;
    const uint8_t* sb = static_cast<const uint8_t*>(src);
    for (uint64_t e = threadIdx.x; e < (uint64_t)R * C; e += blockDim.x) {  // NaN -> +0, else verbatim
      const uint64_t el = (uint64_t)(g % spc) * T * C + (uint64_t)ridx[e / C] * C + e % C;
      const bool nan = kvc_is_nan(kvc_load(src, el, a.dtype));
      for (uint32_t b = 0; b < B; b++) rows[e * B + b] = nan ? 0 : sb[el * B + b];
    }
  }
  so += 2 + 4ull * R + (uint64_t)R * C * B;
  if (j == 0)
    for (uint64_t i = threadIdx.x; i < (uint64_t)C * KVC_CHANNEL_META_SIZE; i += blockDim.x)
      so[i] = a.meta[(uint64_t)g * C * KVC_CHANNEL_META_SIZE + i];
  if (threadIdx.x < 8) {
    const uint32_t v = threadIdx.x < 4 ? a.lane_len[lane] : a.lane_state[lane];
    so[(uint64_t)C * KVC_CHANNEL_META_SIZE + 8 * j + threadIdx.x] = (uint8_t)(v >> (8 * (threadIdx.x & 3)));
  }
  const uint32_t len = a.lane_len[lane];
  const uint8_t* lane_src = a.scratch + (lane + 1) * a.cap - len;
  uint8_t* lane_dst = a.out + a.lane_off[lane];
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) lane_dst[i] = lane_src[i];
}

// Uploads the encoder's models and thresholds once per device; raises the lane kernel's
// shared-memory limit (EncModels is over the 48 KB default).
bool init_encoder(Error& e) {
  int dev = 0;
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice")) return false;
  if (dev < 0 || dev >= 64) return e.fail("device ordinal %d out of range", dev);
  std::lock_guard<std::mutex> lock(g_enc_mu);
  if (g_enc_done[dev]) return true;
  std::vector<EncModels> hm(1);
  build_enc_models(hm[0]);
  if (!cuda_ok(cudaMemcpyToSymbol(d_em, hm.data(), sizeof(EncModels)), e, "model upload") ||
      !cuda_ok(cudaMemcpyToSymbol(d_thr_enc, kvc_model_threshold_q16, sizeof(uint32_t) * KVC_NUM_MODELS), e,
               "threshold upload") ||
      !cuda_ok(cudaFuncSetAttribute(k_lanes_b, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sizeof(EncModels)), e,
               "shared memory limit") ||
      !cuda_ok(cudaFuncSetAttribute(k_plan_tile<KVC_DTYPE_F16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)kPlanTileMaxBytes), e, "shared memory limit") ||
      !cuda_ok(cudaFuncSetAttribute(k_plan_tile<KVC_DTYPE_BF16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)kPlanTileMaxBytes), e, "shared memory limit") ||
      !keep_pool_memory(dev, e))
    return false;
  g_enc_done[dev] = true;
  return true;
}

}  // namespace

// The batch encoder behind both entry points. `place` null: the bitstreams go to `dst` (capacity
// dst_cap) at out_offsets. `place` set: once the sizes are known (the payload gather and its
// checksums already launched), place(ctx, count, out_sizes, dsts) names each chunk's host
// destination (0: skip the chunk); blob_crcs[i] then receives the CRC32C of bitstream i.
static int encode_batch_impl(uint32_t count, const uint64_t* dev_srcs, int dtype, int layout, uint32_t L, uint32_t T,
                             uint32_t H, uint32_t D, int level, int lanes, void* stream, uint8_t* dst, uint64_t dst_cap,
                             uint64_t* out_offsets, uint64_t* out_sizes, kvs_place_fn place, void* ctx,
                             uint32_t* blob_crcs, char* err, size_t err_len) {
  Error e;
  Header h;
  if (count == 0) return KVS_OK;
  if (count > 65535 || !dev_srcs || !out_offsets || !out_sizes) {
    e.fail("batch of %u chunks: 1..65535 chunks and non-null arrays required", count);
    return report(KVS_EINVAL, e, err, err_len);
  }
  if (level <= KVC_LEVEL_LOSSLESS || level >= KVC_NUM_LEVELS) {
    e.fail("GPU encode supports the lossy levels 1..3, got %d (encode lossless on the CPU)", level);
    return report(KVS_EINVAL, e, err, err_len);
  }
  if (dtype < 1 || dtype > 3 || layout < 1 || layout > 2) {
    e.fail("bad dtype %d or layout %d", dtype, layout);
    return report(KVS_EINVAL, e, err, err_len);
  }
  if (!kvc::set_lanes(h, level, lanes, e)) return report(KVS_EINVAL, e, err, err_len);
  h.level = (uint8_t)level; h.dtype = (uint8_t)dtype; h.layout = (uint8_t)layout;
  h.layers = L; h.tokens = T; h.heads = H; h.head_dim = D;
  if (!kvc::check_shape(h, e)) return report(KVS_EINVAL, e, err, err_len);
  for (uint32_t i = 0; i < count; i++)
    if (!dev_srcs[i]) {
      e.fail("chunk %u: null source", i);
      return report(KVS_EINVAL, e, err, err_len);
    }
  if (!init_encoder(e)) return report(KVS_EINTERNAL, e, err, err_len);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint32_t S = h.segments(), C = (uint32_t)h.channels(), spc = L * S;
  const uint64_t segs = (uint64_t)spc * count;
  const uint32_t n = C < h.lanes ? C : h.lanes, nch_max = (C + n - 1) / n;
  if (segs > 0x7FFFFFFFull / n) {
    e.fail("batch of %llu segments too large", (unsigned long long)segs);
    return report(KVS_EINVAL, e, err, err_len);
  }
  const uint64_t elems = h.elements();
  // worst case per symbol: 3 puts of at most 2 renormalisation bytes each
  const uint64_t cap = ((uint64_t)nch_max * T * 6 + 16 + 15) / 16 * 16;
  const kvc_level_params& lp = kvc_level_defaults(level);
  Policy pol;
  for (int x = 0; x < 2; x++) {
    pol.w[x] = lp.w[x];
    for (int y = 0; y < 3; y++) pol.off[x][y] = lp.off[x][y];
  }
  DevBuffers mem(st);
  const uint64_t nlanes = segs * n;
  PlanArgs pa{};
  uint64_t* d_srcs;
  uint8_t *scratch, *out;
  uint32_t *lane_len, *lane_state, *d_crc;
  uint64_t *seg_off, *lane_off;
  // The statistics pass from shared memory where a segment fits (kvs_cuda_codec_set_encoder);
  // the global-memory pass, with its scratch (q, token means, coded lists), otherwise.
  const uint64_t tile_bytes = plan_tile_bytes(T, C);
  const bool tile = g_plan_variant.load() == 1 && (dtype == KVC_DTYPE_F16 || dtype == KVC_DTYPE_BF16) &&
                    tile_bytes <= kPlanTileMaxBytes;
  if (!mem.alloc(&d_srcs, 8ull * count, e) || !mem.alloc(&pa.meta, segs * C * KVC_CHANNEL_META_SIZE, e) ||
      (!tile && !mem.alloc(&pa.q, elems * count * 2, e)) || !mem.alloc(&pa.sym, segs * nch_max * T * n * 2, e) ||
      !mem.alloc(&pa.chan_lc, segs * C * 8, e) || !mem.alloc(&pa.chan_qlmax, segs * C * 4, e) ||
      !mem.alloc(&pa.chan_const, segs * C, e) || (!tile && !mem.alloc(&pa.tok_tm, segs * T * 8, e)) ||
      (!tile && !mem.alloc(&pa.coded_all, segs * T * 4, e)) || !mem.alloc(&pa.raw_count, segs * 4, e) ||
      !mem.alloc(&pa.raw_idx, segs * KVC_MAX_RAW_TOKENS * 4, e) || !mem.alloc(&scratch, nlanes * cap, e) ||
      !mem.alloc(&lane_len, nlanes * 4, e) || !mem.alloc(&lane_state, nlanes * 4, e) ||
      !mem.alloc(&seg_off, segs * 8, e) || !mem.alloc(&lane_off, nlanes * 8, e) ||
      !mem.alloc(&d_crc, 4ull * count * L, e) ||
      !cuda_ok(cudaMemcpyAsync(d_srcs, dev_srcs, 8ull * count, cudaMemcpyHostToDevice, st), e, "copy sources"))
    return report(KVS_EINTERNAL, e, err, err_len);
  pa.srcs = d_srcs; pa.dtype = dtype; pa.L = L; pa.S = S; pa.T = T; pa.C = C; pa.n = n; pa.nch = nch_max;
  pa.pol = pol;
  const uint32_t plan_threads = C <= kPlanThreadsMin ? kPlanThreadsMin : C >= kPlanThreadsMax ? kPlanThreadsMax : (C + 31) / 32 * 32;
  if (!tile) k_plan_b<<<(unsigned)segs, plan_threads, 0, st>>>(pa);
  else if (dtype == KVC_DTYPE_F16) k_plan_tile<KVC_DTYPE_F16><<<(unsigned)segs, plan_threads, tile_bytes, st>>>(pa);
  else k_plan_tile<KVC_DTYPE_BF16><<<(unsigned)segs, plan_threads, tile_bytes, st>>>(pa);
  LaneArgs la{pa.meta, pa.sym, (uint32_t)segs, T, C, n, nch_max, cap, scratch, lane_len, lane_state, pa.raw_count};
  k_lanes_b<<<(unsigned)((nlanes + kLaneThreads - 1) / kLaneThreads), kLaneThreads, sizeof(EncModels), st>>>(la);
  std::vector<uint32_t> hl(nlanes), hr(segs);
  if (!cuda_ok(cudaGetLastError(), e, "encode launch") ||
      !cuda_ok(cudaMemcpyAsync(hl.data(), lane_len, nlanes * 4, cudaMemcpyDeviceToHost, st), e, "copy lane sizes") ||
      !cuda_ok(cudaMemcpyAsync(hr.data(), pa.raw_count, segs * 4, cudaMemcpyDeviceToHost, st), e, "copy raw counts") ||
      !cuda_ok(cudaStreamSynchronize(st), e, "encode kernels"))
    return report(KVS_EINTERNAL, e, err, err_len);
  // payload layout: chunk i's payload at pay_off[i] of `out`; its container at out_offsets[i] of dst
  std::vector<uint64_t> hs(segs), hlo(nlanes, 0), pay_off(count);
  std::vector<uint32_t> layer_size((size_t)count * L, 0);
  uint64_t off = 0, dst_total = 0;
  const uint64_t po = h.payload_offset();
  for (uint32_t c = 0; c < count; c++) {
    pay_off[c] = off;
    for (uint32_t sl = 0; sl < spc; sl++) {
      const uint64_t sg = (uint64_t)c * spc + sl;
      hs[sg] = off;
      uint64_t o = off + 2 + 4ull * hr[sg] + (uint64_t)hr[sg] * C * kvc_dtype_size(dtype) +
                   (uint64_t)C * KVC_CHANNEL_META_SIZE + (uint64_t)n * KVC_LANE_ENTRY_SIZE;
      for (uint32_t j = 0; j < n; j++) {
        hlo[sg * n + j] = o;
        o += hl[sg * n + j];
      }
      uint32_t& ls = layer_size[(size_t)c * L + sl / S];
      if (o - off + ls > 0xFFFFFFFFull) {
        e.fail("layer encodes to more than 4 GiB");
        return report(KVS_EINVAL, e, err, err_len);
      }
      ls += (uint32_t)(o - off);
      off = o;
    }
    out_offsets[c] = dst_total;
    out_sizes[c] = po + (off - pay_off[c]);
    dst_total += (out_sizes[c] + 15) / 16 * 16;
  }
  if (!place && (dst == nullptr || dst_cap < dst_total)) {
    e.fail("output buffer of %llu bytes too small, need %llu", (unsigned long long)dst_cap,
           (unsigned long long)dst_total);
    return report(KVS_ENOSPC, e, err, err_len);
  }
  if (!mem.alloc(&out, off, e) ||
      !cuda_ok(cudaMemcpyAsync(seg_off, hs.data(), segs * 8, cudaMemcpyHostToDevice, st), e, "copy offsets") ||
      !cuda_ok(cudaMemcpyAsync(lane_off, hlo.data(), nlanes * 8, cudaMemcpyHostToDevice, st), e, "copy offsets"))
    return report(KVS_EINTERNAL, e, err, err_len);
  GatherArgs ga{d_srcs, dtype, L, S, T, C, n, cap, pa.raw_count, pa.raw_idx, pa.meta, scratch, lane_len, lane_state,
                seg_off, lane_off, out};
  k_gather_b<<<(unsigned)nlanes, 128, 0, st>>>(ga);
  if (!cuda_ok(cudaGetLastError(), e, "gather launch")) return report(KVS_EINTERNAL, e, err, err_len);
  std::vector<uint64_t> cptr((size_t)count * L), clen((size_t)count * L);
  for (uint32_t c = 0; c < count; c++) {
    uint64_t lo = pay_off[c];
    for (uint32_t l = 0; l < L; l++) {
      cptr[(size_t)c * L + l] = (uint64_t)(uintptr_t)(out + lo);
      clen[(size_t)c * L + l] = layer_size[(size_t)c * L + l];
      lo += layer_size[(size_t)c * L + l];
    }
  }
  char cerr[256] = {0};
  for (uint64_t s0 = 0; s0 < (uint64_t)count * L; s0 += 65535) {
    const uint32_t m = (uint32_t)((uint64_t)count * L - s0 < 65535 ? (uint64_t)count * L - s0 : 65535);
    const int rc = kvs_cuda_crc32c_batch(m, cptr.data() + s0, clen.data() + s0, d_crc + s0, st, cerr, sizeof cerr);
    if (rc != KVS_OK) {
      e.fail("layer checksums on the GPU: %s", cerr);
      return report(rc, e, err, err_len);
    }
  }
  // Placed: each chunk's whole payload is checksummed on the GPU too (its bitstream's CRC32C is
  // that combined with the host's CRC of its header and index), while the caller places it.
  std::vector<uint64_t> dsts(count, 0), pptr(count), plen(count);
  std::vector<uint32_t> pcrc(count, 0);
  uint32_t* d_pcrc = nullptr;
  if (place) {
    for (uint32_t c = 0; c < count; c++) {
      pptr[c] = (uint64_t)(uintptr_t)(out + pay_off[c]);
      plen[c] = out_sizes[c] - po;
    }
    if (!mem.alloc(&d_pcrc, 4ull * count, e)) return report(KVS_EINTERNAL, e, err, err_len);
    const int rc = kvs_cuda_crc32c_batch(count, pptr.data(), plen.data(), d_pcrc, st, cerr, sizeof cerr);
    if (rc != KVS_OK) {
      e.fail("payload checksums on the GPU: %s", cerr);
      return report(rc, e, err, err_len);
    }
    const int prc = place(ctx, count, out_sizes, dsts.data());
    if (prc != 0) {
      cudaStreamSynchronize(st);  // nothing of ours is left in flight on the caller's stream
      e.fail("the caller's placement callback refused the bitstreams (%d)", prc);
      return report(KVS_EINVAL, e, err, err_len);
    }
  } else {
    for (uint32_t c = 0; c < count; c++) dsts[c] = (uint64_t)(uintptr_t)(dst + out_offsets[c]);
  }
  std::vector<uint32_t> crcs((size_t)count * L);
  for (uint32_t c = 0; c < count; c++)
    if (dsts[c] && !cuda_ok(cudaMemcpyAsync(reinterpret_cast<uint8_t*>(dsts[c]) + po, out + pay_off[c],
                                            out_sizes[c] - po, cudaMemcpyDeviceToHost, st), e, "copy payload"))
      return report(KVS_EINTERNAL, e, err, err_len);
  if (!cuda_ok(cudaMemcpyAsync(crcs.data(), d_crc, 4ull * count * L, cudaMemcpyDeviceToHost, st), e, "copy checksums") ||
      (d_pcrc && !cuda_ok(cudaMemcpyAsync(pcrc.data(), d_pcrc, 4ull * count, cudaMemcpyDeviceToHost, st), e,
                          "copy checksums")) ||
      !cuda_ok(cudaStreamSynchronize(st), e, "gather"))
    return report(KVS_EINTERNAL, e, err, err_len);
  for (uint32_t c = 0; c < count; c++) {
    if (!dsts[c]) continue;
    Header hc = h;
    hc.payload_size = out_sizes[c] - po;
    uint8_t* b = reinterpret_cast<uint8_t*>(dsts[c]);
    kvc::write_header_index(hc, layer_size.data() + (size_t)c * L, crcs.data() + (size_t)c * L, b);
    if (place && blob_crcs) blob_crcs[c] = kvs_cuda_crc32c_combine(kvs_crc32c(0, b, po), pcrc[c], out_sizes[c] - po);
  }
  return KVS_OK;
}

KVS_API int kvs_cuda_codec_encode_batch(uint32_t count, const uint64_t* dev_srcs, int dtype, int layout, uint32_t L,
                                        uint32_t T, uint32_t H, uint32_t D, int level, int lanes, void* stream,
                                        uint8_t* dst, uint64_t dst_cap, uint64_t* out_offsets, uint64_t* out_sizes,
                                        char* err, size_t err_len) {
  return encode_batch_impl(count, dev_srcs, dtype, layout, L, T, H, D, level, lanes, stream, dst, dst_cap, out_offsets,
                           out_sizes, nullptr, nullptr, nullptr, err, err_len);
}

KVS_API int kvs_cuda_codec_encode_batch_placed(uint32_t count, const uint64_t* dev_srcs, int dtype, int layout,
                                               uint32_t L, uint32_t T, uint32_t H, uint32_t D, int level, int lanes,
                                               void* stream, kvs_place_fn place, void* ctx, uint64_t* out_sizes, uint32_t* blob_crcs,
                                               char* err, size_t err_len) {
  if (!place || !blob_crcs) {
    Error e;
    e.fail("encode_batch_placed needs a placement callback and a checksum array");
    return report(KVS_EINVAL, e, err, err_len);
  }
  std::vector<uint64_t> offs(count ? count : 1);
  return encode_batch_impl(count, dev_srcs, dtype, layout, L, T, H, D, level, lanes, stream, nullptr, 0, offs.data(),
                           out_sizes, place, ctx, blob_crcs, err, err_len);
}

KVS_API int kvs_cuda_codec_set_encoder(int variant, char* err, size_t err_len) {
  Error e;
  if (variant < 0 || variant > 1) {
    e.fail("encoder variant %d out of range (0 = global-memory statistics, 1 = shared-memory tile)", variant);
    return report(KVS_EINVAL, e, err, err_len);
  }
  g_plan_variant.store(variant);
  return KVS_OK;
}
