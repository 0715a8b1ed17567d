// Lossless segment codec: the raw bytes of the elements split into byte planes (plane b =
// byte b of every little-endian element), each plane stored raw or order-0 rANS coded with
// a normalised frequency table shipped in the segment.
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "rans.h"
#include "segment.h"

namespace kvc {
namespace {

constexpr uint8_t kPlaneRaw = 0;
constexpr uint8_t kPlaneRans = 1;

// Deterministic normalisation of counts to KVC_PROB_TOTAL, every present symbol >= 1.
void normalize(const uint64_t* count, uint64_t total, uint32_t* freq) {
  int64_t sum = 0;
  for (int s = 0; s < 256; s++) {
    freq[s] = 0;
    if (count[s]) {
      freq[s] = (uint32_t)std::max<uint64_t>(1, count[s] * KVC_PROB_TOTAL / total);
      sum += freq[s];
    }
  }
  while (sum != (int64_t)KVC_PROB_TOTAL) {
    int best = -1;
    for (int s = 0; s < 256; s++) {
      if (!count[s] || (sum > (int64_t)KVC_PROB_TOTAL && freq[s] <= 1)) continue;
      if (best < 0 || freq[s] > freq[best]) best = s;
    }
    if (sum < (int64_t)KVC_PROB_TOTAL) { freq[best]++; sum++; }
    else { freq[best]--; sum--; }
  }
}

#if defined(__x86_64__)
bool have_avx2() {
  static const bool h = __builtin_cpu_supports("avx2");
  return h;
}

// AVX2 decode of whole rows (32 lanes = 4 vectors of 8 states) while every lane has room for
// a block of rows without bounds checks; returns the number of symbols decoded. Identical
// arithmetic to RansDecoder::decode. `base` is the first byte of lane 0 (lanes are contiguous).
__attribute__((target("avx2"))) uint64_t decode_rows_avx2(RansDecoder* dec, const uint32_t* entry,
                                                          const uint8_t* base, uint8_t* d, uint32_t B,
                                                          uint32_t b, uint64_t n) {
  constexpr uint32_t kBlock = 32;  // rows per bounds decision; a symbol reads <= 2 bytes
  const __m256i mask12 = _mm256_set1_epi32(KVC_PROB_TOTAL - 1), ff = _mm256_set1_epi32(0xFF),
                fff = _mm256_set1_epi32(0xFFF), one = _mm256_set1_epi32(1),
                lim = _mm256_set1_epi32((int)KVC_RANS_L);
  uint64_t i = 0;
  for (;;) {
    if (i + (uint64_t)kBlock * KVC_LOSSLESS_LANES > n) break;
    bool room = true;
    for (uint32_t j = 0; j < KVC_LOSSLESS_LANES; j++)
      room &= dec[j].p <= dec[j].end && (uint64_t)(dec[j].end - dec[j].p) >= 2u * kBlock + 4u;
    if (!room) break;
    __m256i X[4], P[4];
    for (int v = 0; v < 4; v++) {
      alignas(32) int32_t xs[8], ps[8];
      for (int k = 0; k < 8; k++) { xs[k] = (int32_t)dec[8 * v + k].x; ps[k] = (int32_t)(dec[8 * v + k].p - base); }
      X[v] = _mm256_load_si256((const __m256i*)xs);
      P[v] = _mm256_load_si256((const __m256i*)ps);
    }
    for (uint32_t r = 0; r < kBlock; r++, i += KVC_LOSSLESS_LANES) {
      alignas(32) int32_t sym[32];
      for (int v = 0; v < 4; v++) {
        const __m256i e = _mm256_i32gather_epi32((const int*)entry, _mm256_and_si256(X[v], mask12), 4);
        const __m256i freq = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 8), fff), one);
        X[v] = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(X[v], KVC_PROB_BITS)),
                                _mm256_srli_epi32(e, 20));
        for (int step = 0; step < 2; step++) {
          const __m256i need = _mm256_cmpgt_epi32(lim, X[v]);  // states < 2^31: signed compare ok
          const __m256i byte = _mm256_and_si256(_mm256_i32gather_epi32((const int*)base, P[v], 1), ff);
          const __m256i nx = _mm256_or_si256(_mm256_slli_epi32(X[v], 8), byte);
          X[v] = _mm256_blendv_epi8(X[v], nx, need);
          P[v] = _mm256_sub_epi32(P[v], need);
        }
        _mm256_store_si256((__m256i*)(sym + 8 * v), _mm256_and_si256(e, ff));
      }
      for (uint32_t j = 0; j < KVC_LOSSLESS_LANES; j++) d[(i + j) * B + b] = (uint8_t)sym[j];
    }
    for (int v = 0; v < 4; v++) {
      alignas(32) int32_t xs[8], ps[8];
      _mm256_store_si256((__m256i*)xs, X[v]);
      _mm256_store_si256((__m256i*)ps, P[v]);
      for (int k = 0; k < 8; k++) { dec[8 * v + k].x = (uint32_t)xs[k]; dec[8 * v + k].p = base + ps[k]; }
    }
  }
  return i;
}
#endif

}  // namespace

void encode_lossless_segment(const void* src, int dtype, uint64_t n, std::vector<uint8_t>& out) {
  const uint32_t B = kvc_dtype_size(dtype);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  const uint32_t lanes = (uint32_t)std::min<uint64_t>(KVC_LOSSLESS_LANES, n);
  for (uint32_t b = 0; b < B; b++) {
    uint64_t count[256] = {0};
    for (uint64_t i = 0; i < n; i++) count[s[i * B + b]]++;
    uint32_t freq[256], cum[257];
    normalize(count, n, freq);
    double bits = 0;
    uint32_t present = 0;
    cum[0] = 0;
    for (int v = 0; v < 256; v++) {
      if (count[v]) { bits += (double)count[v] * (KVC_PROB_BITS - log2((double)freq[v])); present++; }
      cum[v + 1] = cum[v] + freq[v];
    }
    const double coded = bits / 8 + 3.0 * present + KVC_LANE_ENTRY_SIZE * lanes + 8.0 * lanes;
    if (coded >= (double)n) {  // incompressible plane: raw is smaller and faster
      out.push_back(kPlaneRaw);
      for (uint64_t i = 0; i < n; i++) out.push_back(s[i * B + b]);
      continue;
    }
    out.push_back(kPlaneRans);
    append16(out, present);
    for (int v = 0; v < 256; v++)
      if (count[v]) { out.push_back((uint8_t)v); append16(out, freq[v]); }
    std::vector<std::vector<uint8_t>> bytes(lanes);
    std::vector<uint32_t> states(lanes);
    for (uint32_t j = 0; j < lanes; j++) {
      RansEncoder enc;
      const uint64_t cnt = (n - j + lanes - 1) / lanes;
      for (uint64_t i = cnt; i-- > 0;) {
        const uint8_t v = s[(j + i * lanes) * B + b];
        enc.put(cum[v], freq[v]);
      }
      enc.finish(bytes[j]);
      states[j] = enc.x;
    }
    for (uint32_t j = 0; j < lanes; j++) { append32(out, (uint32_t)bytes[j].size()); append32(out, states[j]); }
    for (uint32_t j = 0; j < lanes; j++) out.insert(out.end(), bytes[j].begin(), bytes[j].end());
  }
}

bool decode_lossless_segment(const uint8_t** pp, const uint8_t* end, void* dst, int dtype, uint64_t n,
                             Error& err) {
  const uint32_t B = kvc_dtype_size(dtype);
  uint8_t* d = static_cast<uint8_t*>(dst);
  const uint8_t* p = *pp;
  const uint32_t lanes = (uint32_t)std::min<uint64_t>(KVC_LOSSLESS_LANES, n);
  for (uint32_t b = 0; b < B; b++) {
    if (p >= end) return err.fail("truncated lossless plane %u", b);
    const uint8_t kind = *p++;
    if (kind == kPlaneRaw) {
      if ((uint64_t)(end - p) < n) return err.fail("truncated raw plane %u", b);
      for (uint64_t i = 0; i < n; i++) d[i * B + b] = p[i];
      p += n;
      continue;
    }
    if (kind != kPlaneRans) return err.fail("plane %u: unknown kind %u", b, kind);
    if (end - p < 2) return err.fail("truncated plane table");
    const uint32_t present = read16(p);
    p += 2;
    if (present == 0 || present > 256 || (uint64_t)(end - p) < 3ull * present)
      return err.fail("plane %u: bad symbol table (%u symbols)", b, present);
    uint32_t freq[256] = {0}, cum[256] = {0}, sum = 0;
    int last = -1;
    for (uint32_t i = 0; i < present; i++) {
      const int v = p[3 * i];
      const uint32_t f = read16(p + 3 * i + 1);
      if (v <= last || f == 0 || f > KVC_PROB_TOTAL) return err.fail("plane %u: malformed symbol table", b);
      last = v;
      freq[v] = f;
      cum[v] = sum;
      sum += f;
      if (sum > KVC_PROB_TOTAL) return err.fail("plane %u: frequencies exceed the total", b);
    }
    if (sum != KVC_PROB_TOTAL) return err.fail("plane %u: frequencies do not sum to %u", b, KVC_PROB_TOTAL);
    p += 3 * present;
    uint32_t entry[KVC_PROB_TOTAL];
    for (int v = 0; v < 256; v++)
      for (uint32_t s = cum[v]; s < cum[v] + freq[v]; s++) entry[s] = pack_entry((uint32_t)v, freq[v], s - cum[v]);
    LaneSpan spans[KVC_LOSSLESS_LANES];
    if (!read_lane_table(&p, end, lanes, spans, err)) return false;
    RansDecoder dec[KVC_LOSSLESS_LANES];
    for (uint32_t j = 0; j < lanes; j++) dec[j] = {spans[j].state, spans[j].begin, spans[j].end};
    uint64_t i = 0;
#if defined(__x86_64__)
    if (lanes == KVC_LOSSLESS_LANES && have_avx2()) i = decode_rows_avx2(dec, entry, spans[0].begin, d, B, b, n);
#endif
    for (; i + lanes <= n; i += lanes) {
      for (uint32_t j = 0; j < lanes; j++) d[(i + j) * B + b] = dec[j].decode(entry);
    }
    for (uint32_t j = 0; i + j < n; j++) {
      d[(i + j) * B + b] = dec[j].decode(entry);
    }
    for (uint32_t j = 0; j < lanes; j++)
      if (!dec[j].finished_cleanly()) return err.fail("plane %u: lane %u does not end cleanly", b, j);
  }
  *pp = p;
  return true;
}

}  // namespace kvc
