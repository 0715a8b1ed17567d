// Lossy segment codec (CPU). The CUDA twin is native/cuda/codec.cu; both follow the
// policy functions of common.h so their bytes are identical.
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "rans.h"
#include "segment.h"
#include "tables.h"

namespace kvc {

const Models& models() {
  static const Models* m = [] {
    Models* t = new Models();
    for (int k = 0; k < KVC_NUM_MODELS; k++) {
      const uint32_t n = kvc_model_limit[k] + 1u;
      t->limit[k] = kvc_model_limit[k];
      uint32_t c = 0;
      for (uint32_t z = 0; z < 256; z++) {
        t->freq[k][z] = z < n ? kvc_model_freq[kvc_model_offset[k] + z] : 0;
        t->cum[k][z] = (uint16_t)c;
        for (uint32_t s = c; s < c + t->freq[k][z]; s++) {
          t->lookup[k][s] = (uint8_t)z;
          t->entry[k][s] = pack_entry(z, t->freq[k][z], s - c);
        }
        c += t->freq[k][z];
      }
      t->cum[k][256] = (uint16_t)c;
    }
    return t;
  }();
  return *m;
}

bool read_lane_table(const uint8_t** pp, const uint8_t* end, uint32_t n, LaneSpan* lanes, Error& err) {
  const uint8_t* p = *pp;
  if ((uint64_t)(end - p) < (uint64_t)n * KVC_LANE_ENTRY_SIZE) return err.fail("truncated lane table");
  const uint8_t* data = p + (size_t)n * KVC_LANE_ENTRY_SIZE;
  for (uint32_t j = 0; j < n; j++) {
    uint32_t len = read32(p + 8 * j), st = read32(p + 8 * j + 4);
    if (st < KVC_RANS_L || st >= (KVC_RANS_L << 8)) return err.fail("lane %u: rANS state 0x%x out of range", j, st);
    if ((uint64_t)len > (uint64_t)(end - data)) return err.fail("lane %u: length %u beyond the segment", j, len);
    lanes[j] = {data, data + len, st};
    data += len;
  }
  *pp = data;
  return true;
}

// Tokens kept verbatim: mean quarter-log2 magnitude at least KVC_RAW_TOKEN_DEVIATION away
// from the segment mean, the first KVC_MAX_RAW_TOKENS in token order.
std::vector<uint32_t> select_raw_tokens(const float* xs, const int32_t* ql, uint32_t T, uint32_t C) {
  (void)xs;
  std::vector<int64_t> tm(T);
  int64_t sum_tm = 0;
  for (uint32_t t = 0; t < T; t++) {
    int64_t s = 0;
    for (uint32_t c = 0; c < C; c++) s += ql[(size_t)t * C + c];
    tm[t] = kvc_floordiv(s, C);
    sum_tm += tm[t];
  }
  const int64_t mean = kvc_floordiv(sum_tm, T);
  std::vector<uint32_t> raw;
  for (uint32_t t = 0; t < T && raw.size() < KVC_MAX_RAW_TOKENS; t++)
    if (tm[t] - mean >= KVC_RAW_TOKEN_DEVIATION || mean - tm[t] >= KVC_RAW_TOKEN_DEVIATION) raw.push_back(t);
  return raw;
}

void encode_lossy_segment(const void* src, int dtype, uint32_t T, uint32_t C, uint32_t lanes, int32_t off,
                          int32_t w, std::vector<uint8_t>& out) {
  const Models& M = models();
  const uint32_t B = kvc_dtype_size(dtype);
  // sanitised values and their quarter-log2 magnitudes, computed once
  std::vector<float> xs((size_t)T * C);
  std::vector<int32_t> qls((size_t)T * C);
  for (size_t i = 0; i < (size_t)T * C; i++) {
    xs[i] = kvc_sanitize(kvc_load(src, i, dtype));
    qls[i] = kvc_qlog(xs[i]);
  }
  const std::vector<uint32_t> raw = select_raw_tokens(xs.data(), qls.data(), T, C);
  std::vector<uint32_t> coded;  // the other tokens, in order
  for (uint32_t t = 0, r = 0; t < T; t++) {
    if (r < raw.size() && raw[r] == t) { r++; continue; }
    coded.push_back(t);
  }
  const uint32_t TC = (uint32_t)coded.size();
  append16(out, (uint32_t)raw.size());
  for (uint32_t t : raw) append32(out, t);
  for (uint32_t t : raw) {
    const uint8_t* row = static_cast<const uint8_t*>(src) + (uint64_t)t * C * B;
    const size_t at = out.size();
    out.insert(out.end(), row, row + (uint64_t)C * B);
    for (uint32_t c = 0; c < C; c++)  // NaN -> +0, everything else verbatim
      if (kvc_is_nan(kvc_load(src, (uint64_t)t * C + c, dtype))) memset(out.data() + at + (size_t)c * B, 0, B);
  }
  // channel statistics over the coded tokens (integer, order independent)
  std::vector<int64_t> sum_ql(C, 0);
  std::vector<int32_t> max_ql(C, KVC_QL_FLOOR);
  std::vector<uint8_t> constant(C, 1);
  for (uint32_t t : coded)
    for (uint32_t c = 0; c < C; c++) {
      const float v = xs[(size_t)t * C + c];
      if (kvc_f2u(v) != kvc_f2u(xs[(size_t)coded[0] * C + c])) constant[c] = 0;
      int32_t ql = qls[(size_t)t * C + c];
      sum_ql[c] += ql;
      max_ql[c] = std::max(max_ql[c], ql);
    }
  const uint32_t TD = TC ? TC : 1;  // divisor; with no coded token every sum is 0
  int64_t sum_lc = 0;
  std::vector<int64_t> lc(C);
  for (uint32_t c = 0; c < C; c++) { lc[c] = kvc_floordiv(sum_ql[c], TD); sum_lc += lc[c]; }
  const int64_t lbar = kvc_floordiv(sum_lc, C);
  std::vector<uint8_t> code(C), model(C);
  std::vector<float> step(C);
  std::vector<int32_t> center(C);
  for (uint32_t c = 0; c < C; c++) {
    code[c] = (uint8_t)kvc_step_code(lc[c], lbar, max_ql[c], off, w, constant[c] != 0);
    step[c] = kvc_step(code[c]);
  }
  std::vector<int16_t> q((size_t)T * C, 0);
  std::vector<int64_t> sum_q(C, 0);
  for (uint32_t t : coded)
    for (uint32_t c = 0; c < C; c++) {
      int32_t v = kvc_quantize(xs[(size_t)t * C + c], step[c]);
      q[(size_t)t * C + c] = (int16_t)v;
      sum_q[c] += v;
    }
  for (uint32_t c = 0; c < C; c++) {
    const int32_t ctr = kvc_center(sum_q[c], TD);
    uint64_t cost_c = 0, cost_d = 0;
    int32_t prev = ctr;
    for (uint32_t t : coded) {
      int32_t v = q[(size_t)t * C + c];
      cost_c += (uint64_t)std::abs(v - ctr);
      cost_d += (uint64_t)std::abs(v - prev);
      prev = v;
    }
    const bool delta = cost_d < cost_c;
    center[c] = ctr;
    model[c] = (uint8_t)(kvc_choose_model(delta ? cost_d : cost_c, TD, kvc_model_threshold_q16, KVC_NUM_MODELS) |
                         (delta ? KVC_MODEL_DELTA_BIT : 0u));
  }
  for (uint32_t c = 0; c < C; c++) {
    out.push_back(code[c]);
    out.push_back(model[c]);
    append16(out, (uint16_t)(int16_t)center[c]);
  }
  const uint32_t n = std::min<uint32_t>(lanes, C);
  std::vector<std::vector<uint8_t>> lane_bytes(n);
  std::vector<uint32_t> states(n);
  for (uint32_t j = 0; j < n; j++) {
    RansEncoder enc;
    uint32_t nch = (C - j + n - 1) / n;
    for (uint32_t ci = nch; ci-- > 0;) {
      const uint32_t c = j + ci * n;
      const uint32_t k = model[c] & KVC_MODEL_INDEX_MASK, lim = M.limit[k];
      const bool delta = model[c] & KVC_MODEL_DELTA_BIT;
      for (uint32_t i = TC; i-- > 0;) {
        const int32_t pred = (delta && i > 0) ? q[(size_t)coded[i - 1] * C + c] : center[c];
        const uint32_t z = kvc_zigzag(q[(size_t)coded[i] * C + c] - pred);
        if (z < lim) {
          enc.put(M.cum[k][z], M.freq[k][z]);
        } else {
          enc.put((z >> 8) * KVC_BYPASS_FREQ, KVC_BYPASS_FREQ);
          enc.put((z & 0xFF) * KVC_BYPASS_FREQ, KVC_BYPASS_FREQ);
          enc.put(M.cum[k][lim], M.freq[k][lim]);
        }
      }
    }
    enc.finish(lane_bytes[j]);
    states[j] = enc.x;
  }
  for (uint32_t j = 0; j < n; j++) { append32(out, (uint32_t)lane_bytes[j].size()); append32(out, states[j]); }
  for (uint32_t j = 0; j < n; j++) out.insert(out.end(), lane_bytes[j].begin(), lane_bytes[j].end());
}

namespace {

struct LaneState {
  uint32_t x;
  const uint8_t* p;
  const uint8_t* end;
  const uint32_t* ent;  // decode entries of the channel's model
  int32_t pred;
  uint32_t lim;
  bool delta;
};

// Branchless renormalisation: a symbol of probability >= 2^-12 needs at most two bytes.
// Reads past the lane's end yield 0 and push p beyond end, which the final check rejects.
static const uint8_t kZeroByte = 0;
#define KVC_RENORM_STEP(L)                                      \
  {                                                             \
    const uint32_t need = (L).x < KVC_RANS_L;                   \
    const uint8_t* src = (L).p < (L).end ? (L).p : &kZeroByte;  \
    const uint32_t byte = *src & (0u - need);                   \
    (L).x = ((L).x << (need << 3)) | byte;                      \
    (L).p += need;                                              \
  }
#define KVC_RENORM(L) KVC_RENORM_STEP(L) KVC_RENORM_STEP(L)

// Unchecked renormalisation, for stretches where the lane has enough bytes left.
#define KVC_RENORM_FAST_STEP(L)                                 \
  {                                                             \
    const uint32_t need = (L).x < KVC_RANS_L;                   \
    const uint32_t byte = *(L).p & (0u - need);                 \
    (L).x = ((L).x << (need << 3)) | byte;                      \
    (L).p += need;                                              \
  }

// Bytes one residual can consume at most: symbol (2) + escape bytes (2 x 2).
constexpr uint32_t kMaxBytesPerValue = 6;

// One residual of lane L; returns the quantised value. FAST: the caller guarantees the lane
// has at least kMaxBytesPerValue unread bytes.
template <bool FAST>
inline int32_t decode_value(LaneState& L) {
  uint32_t e = L.ent[L.x & (KVC_PROB_TOTAL - 1)];
  uint32_t z = e & 0xFFu;
  L.x = (((e >> 8) & 0xFFFu) + 1u) * (L.x >> KVC_PROB_BITS) + (e >> 20);
  if (FAST) {
    KVC_RENORM_FAST_STEP(L) KVC_RENORM_FAST_STEP(L)
  } else {
    KVC_RENORM(L)
  }
  if (__builtin_expect(z == L.lim, 0)) {
    uint32_t b[2];
    for (int i = 0; i < 2; i++) {
      const uint32_t slot = L.x & (KVC_PROB_TOTAL - 1);
      b[i] = slot / KVC_BYPASS_FREQ;
      L.x = KVC_BYPASS_FREQ * (L.x >> KVC_PROB_BITS) + slot - b[i] * KVC_BYPASS_FREQ;
      KVC_RENORM(L)
    }
    z = b[0] | (b[1] << 8);
  }
  const int32_t v = L.pred + kvc_unzigzag(z);
  L.pred = L.delta ? v : L.pred;
  return v;
}

// Dequantise one row of m lanes (steps per lane) and store it in the chunk dtype.
template <int DT>
inline void store_row(const int32_t* q, const float* step, uint32_t m, void* dst, uint64_t at) {
  for (uint32_t j = 0; j < m; j++) {
    const float f = kvc_dequantize(q[j], step[j]);
    if (DT == KVC_DTYPE_F16) ((uint16_t*)dst)[at + j] = kvc_float_to_half(f);
    else if (DT == KVC_DTYPE_BF16) ((uint16_t*)dst)[at + j] = kvc_float_to_bf16(f);
    else ((float*)dst)[at + j] = f;
  }
}

#if defined(__x86_64__)
// Same result as store_row<F16>: IEEE binary32 multiply and round-to-nearest-even binary16
// conversion (tests/codec check the software conversion against numpy bit for bit).
__attribute__((target("avx2,f16c"))) void store_row_f16_hw(const int32_t* q, const float* step, uint32_t m,
                                                              void* dst, uint64_t at) {
  uint16_t* out = (uint16_t*)dst + at;
  uint32_t j = 0;
  for (; j + 8 <= m; j += 8) {
    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(q + j))), _mm256_loadu_ps(step + j));
    _mm_storeu_si128((__m128i*)(out + j), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; j < m; j++) out[j] = kvc_float_to_half(kvc_dequantize(q[j], step[j]));
}
bool have_f16c() {
  static const bool h = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return h;
}
#endif

#if defined(__x86_64__)
bool have_avx2() {
  static const bool h = __builtin_cpu_supports("avx2");
  return h;
}

// AVX2 decode of rows t0..t1 of 32 lanes (4 vectors of 8), same arithmetic as decode_value.
// The caller guarantees every lane has >= kMaxBytesPerValue * (t1 - t0) + 4 unread bytes and
// that lanes[*].p >= base. A vector whose row contains an escape is decoded by the scalar
// path for that row. Returns the out-of-range flag.
__attribute__((target("avx2"))) uint32_t decode_rows_avx2(const Models& M, LaneState* lanes, const uint8_t* base,
                                                          int32_t* qbuf, uint32_t n, uint32_t t0, uint32_t t1) {
  const __m256i mask12 = _mm256_set1_epi32(KVC_PROB_TOTAL - 1), ff = _mm256_set1_epi32(0xFF),
                fff = _mm256_set1_epi32(0xFFF), one = _mm256_set1_epi32(1),
                lim_l = _mm256_set1_epi32((int)KVC_RANS_L), qmax = _mm256_set1_epi32(KVC_QMAX),
                qmin = _mm256_set1_epi32(-KVC_QMAX);
  const int* table = (const int*)&M.entry[0][0];
  __m256i X[4], P[4], K[4], LIM[4], PRED[4], DELTA[4];
  auto load = [&](int v) __attribute__((target("avx2"))) {
    alignas(32) int32_t xs[8], ps[8], ks[8], ls[8], pr[8], de[8];
    for (int k = 0; k < 8; k++) {
      const LaneState& L = lanes[8 * v + k];
      xs[k] = (int32_t)L.x; ps[k] = (int32_t)(L.p - base);
      ks[k] = (int32_t)((L.ent - &M.entry[0][0]));
      ls[k] = (int32_t)L.lim; pr[k] = L.pred; de[k] = L.delta ? -1 : 0;
    }
    X[v] = _mm256_load_si256((const __m256i*)xs); P[v] = _mm256_load_si256((const __m256i*)ps);
    K[v] = _mm256_load_si256((const __m256i*)ks); LIM[v] = _mm256_load_si256((const __m256i*)ls);
    PRED[v] = _mm256_load_si256((const __m256i*)pr); DELTA[v] = _mm256_load_si256((const __m256i*)de);
  };
  auto save = [&](int v) __attribute__((target("avx2"))) {
    alignas(32) int32_t xs[8], ps[8], pr[8];
    _mm256_store_si256((__m256i*)xs, X[v]); _mm256_store_si256((__m256i*)ps, P[v]);
    _mm256_store_si256((__m256i*)pr, PRED[v]);
    for (int k = 0; k < 8; k++) {
      LaneState& L = lanes[8 * v + k];
      L.x = (uint32_t)xs[k]; L.p = base + ps[k]; L.pred = pr[k];
    }
  };
  for (int v = 0; v < 4; v++) load(v);
  __m256i bad = _mm256_setzero_si256();
  uint32_t bad_scalar = 0;
  for (uint32_t t = t0; t < t1; t++) {
    int32_t* qrow = qbuf + (size_t)t * n;
    for (int v = 0; v < 4; v++) {
      const __m256i e = _mm256_i32gather_epi32(table, _mm256_add_epi32(K[v], _mm256_and_si256(X[v], mask12)), 4);
      const __m256i z = _mm256_and_si256(e, ff);
      if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(z, LIM[v]))) {  // escape in this vector: scalar row
        save(v);
        for (int k = 0; k < 8; k++) {
          const int32_t q = decode_value<true>(lanes[8 * v + k]);
          bad_scalar |= (uint32_t)(q + KVC_QMAX) > 2u * KVC_QMAX;
          qrow[8 * v + k] = q;
        }
        load(v);
        continue;
      }
      const __m256i freq = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 8), fff), one);
      X[v] = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(X[v], KVC_PROB_BITS)), _mm256_srli_epi32(e, 20));
      for (int step = 0; step < 2; step++) {
        const __m256i need = _mm256_cmpgt_epi32(lim_l, X[v]);
        const __m256i byte = _mm256_and_si256(_mm256_i32gather_epi32((const int*)base, P[v], 1), ff);
        X[v] = _mm256_blendv_epi8(X[v], _mm256_or_si256(_mm256_slli_epi32(X[v], 8), byte), need);
        P[v] = _mm256_sub_epi32(P[v], need);
      }
      // v = pred + unzigzag(z); unzigzag(z) = (z >> 1) ^ -(z & 1)
      const __m256i r = _mm256_xor_si256(_mm256_srli_epi32(z, 1), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_and_si256(z, one)));
      const __m256i q = _mm256_add_epi32(PRED[v], r);
      bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi32(q, qmax), _mm256_cmpgt_epi32(qmin, q)));
      PRED[v] = _mm256_blendv_epi8(PRED[v], q, DELTA[v]);
      _mm256_storeu_si256((__m256i*)(qrow + 8 * v), q);
    }
  }
  for (int v = 0; v < 4; v++) save(v);
  return bad_scalar | (uint32_t)(_mm256_movemask_epi8(bad) != 0);
}
#endif

template <int DT>
bool decode_lossy_impl(const Models& M, LaneState* lanes, uint32_t n, const uint8_t* meta, void* dst,
                       const uint32_t* coded, uint32_t TC, uint32_t C, Error& err) {
#if defined(__x86_64__)
  const bool avx2 = have_avx2();
  // lanes are contiguous from lane 0's start; 32-bit gather offsets need < 2 GiB of lanes
  const uint8_t* spans_base =
      (n && (uint64_t)(lanes[n - 1].end - lanes[0].p) < (1ull << 31)) ? lanes[0].p : nullptr;
#endif
  const uint32_t nci = (C + n - 1) / n;
  const uint8_t* const data_end = n ? lanes[n - 1].end : nullptr;
  std::vector<int32_t> qbuf((size_t)TC * n);
  float step[KVC_MAX_LANES];
#if defined(__x86_64__)
  const bool hw = DT == KVC_DTYPE_F16 && have_f16c();
#endif
  for (uint32_t ci = 0; ci < nci; ci++) {
    const uint32_t m = std::min(n, C - ci * n);  // active lanes: a prefix
    for (uint32_t j = 0; j < m; j++) {
      const uint32_t c = j + ci * n;
      LaneState& L = lanes[j];
      const uint32_t k = meta[4 * c + 1] & KVC_MODEL_INDEX_MASK;
      step[j] = kvc_step(meta[4 * c]);
      L.ent = M.entry[k];
      L.lim = M.limit[k];
      L.delta = meta[4 * c + 1] & KVC_MODEL_DELTA_BIT;
      L.pred = (int16_t)read16(meta + 4 * c + 2);
    }
    uint32_t bad = 0;
    constexpr uint32_t kBlock = 16;  // tokens per bounds decision
    for (uint32_t t0 = 0; t0 < TC; t0 += kBlock) {
      const uint32_t t1 = std::min(TC, t0 + kBlock);
      // Decided per group of 32 lanes (all m lanes when m is not a multiple of 32): unchecked
      // reads stay inside the segment's lane bytes (lanes are contiguous, lane 0 first), so
      // only the group holding the last lane ever needs the checked path. A lane that runs
      // past its own end reads its neighbours' bytes and ends past its end, which the final
      // check rejects exactly as the checked path's zero bytes do.
      const uint32_t gw = m % 32u == 0 ? 32u : m;
      for (uint32_t g0 = 0; g0 < m; g0 += gw) {
        uint64_t room = UINT64_MAX;
        for (uint32_t j = g0; j < g0 + gw; j++)
          room = std::min<uint64_t>(room, lanes[j].p < data_end ? (uint64_t)(data_end - lanes[j].p) : 0);
        const bool fast = room >= (uint64_t)kMaxBytesPerValue * kBlock + 4;
#if defined(__x86_64__)
        if (fast && gw == 32u && avx2 && spans_base != nullptr) {
          bad |= decode_rows_avx2(M, lanes + g0, spans_base, qbuf.data() + g0, n, t0, t1);
          continue;
        }
#endif
        for (uint32_t t = t0; t < t1; t++) {
          int32_t* qrow = qbuf.data() + (size_t)t * n;
          if (fast) {
            for (uint32_t j = g0; j < g0 + gw; j++) {
              const int32_t v = decode_value<true>(lanes[j]);
              bad |= (uint32_t)(v + KVC_QMAX) > 2u * KVC_QMAX;
              qrow[j] = v;
            }
          } else {
            for (uint32_t j = g0; j < g0 + gw; j++) {
              const int32_t v = decode_value<false>(lanes[j]);
              bad |= (uint32_t)(v + KVC_QMAX) > 2u * KVC_QMAX;
              qrow[j] = v;
            }
          }
        }
      }
    }
    if (bad) return err.fail("corrupt lossy segment: value out of range");
    for (uint32_t t = 0; t < TC; t++) {
      const uint64_t at = (uint64_t)coded[t] * C + (uint64_t)ci * n;
#if defined(__x86_64__)
      if (hw) { store_row_f16_hw(qbuf.data() + (size_t)t * n, step, m, dst, at); continue; }
#endif
      store_row<DT>(qbuf.data() + (size_t)t * n, step, m, dst, at);
    }
  }
  for (uint32_t j = 0; j < n; j++)
    if (!(lanes[j].x == KVC_RANS_L && lanes[j].p == lanes[j].end))
      return err.fail("corrupt lossy segment: lane %u does not end cleanly", j);
  return true;
}

}  // namespace

bool decode_lossy_segment(const uint8_t** pp, const uint8_t* end, void* dst, int dtype, uint32_t T,
                          uint32_t C, uint32_t lanes_max, Error& err) {
  const uint8_t* p = *pp;
  const uint32_t B = kvc_dtype_size(dtype);
  if (end - p < 2) return err.fail("truncated raw-token count");
  const uint32_t R = read16(p);
  p += 2;
  if (R > KVC_MAX_RAW_TOKENS || R > T) return err.fail("raw-token count %u out of range", R);
  if ((uint64_t)(end - p) < 4ull * R + (uint64_t)R * C * B) return err.fail("truncated raw tokens");
  std::vector<uint32_t> coded;
  coded.reserve(T - R);
  {
    uint32_t next = 0;
    for (uint32_t r = 0; r < R; r++) {
      const uint32_t t = read32(p + 4 * r);
      if (t >= T || t < next) return err.fail("raw-token index %u not increasing / out of range", t);
      for (; next < t; next++) coded.push_back(next);
      next = t + 1;
    }
    for (; next < T; next++) coded.push_back(next);
    const uint8_t* rows = p + 4 * R;
    for (uint32_t r = 0; r < R; r++)
      memcpy(static_cast<uint8_t*>(dst) + (uint64_t)read32(p + 4 * r) * C * B, rows + (uint64_t)r * C * B,
             (size_t)C * B);
    p += 4ull * R + (uint64_t)R * C * B;
  }
  const uint32_t TC = (uint32_t)coded.size();
  if ((uint64_t)(end - p) < (uint64_t)C * KVC_CHANNEL_META_SIZE) return err.fail("truncated channel table");
  const uint8_t* meta = p;
  for (uint32_t c = 0; c < C; c++) {
    const uint8_t mb = meta[4 * c + 1];
    const int32_t ctr = (int16_t)read16(meta + 4 * c + 2);
    if (mb & KVC_MODEL_RESERVED_MASK) return err.fail("channel %u: reserved model bit set", c);
    if ((mb & KVC_MODEL_INDEX_MASK) >= KVC_NUM_MODELS) return err.fail("channel %u: bad model", c);
    if (ctr > KVC_QMAX || ctr < -KVC_QMAX) return err.fail("channel %u: centre %d out of range", c, ctr);
  }
  p += (size_t)C * KVC_CHANNEL_META_SIZE;
  const uint32_t n = std::min<uint32_t>(lanes_max, C);
  if (n > KVC_MAX_LANES) return err.fail("lane count %u above %u", n, KVC_MAX_LANES);
  LaneSpan spans[KVC_MAX_LANES];
  if (!read_lane_table(&p, end, n, spans, err)) return false;
  LaneState lanes[KVC_MAX_LANES];
  for (uint32_t j = 0; j < n; j++) lanes[j] = {spans[j].state, spans[j].begin, spans[j].end, nullptr, 0, 0, false};
  const Models& M = models();
  bool ok;
  if (dtype == KVC_DTYPE_F16) ok = decode_lossy_impl<KVC_DTYPE_F16>(M, lanes, n, meta, dst, coded.data(), TC, C, err);
  else if (dtype == KVC_DTYPE_BF16) ok = decode_lossy_impl<KVC_DTYPE_BF16>(M, lanes, n, meta, dst, coded.data(), TC, C, err);
  else ok = decode_lossy_impl<KVC_DTYPE_F32>(M, lanes, n, meta, dst, coded.data(), TC, C, err);
  if (!ok) return false;
  *pp = p;
  return true;
}

}  // namespace kvc
