// CRC32C (kvs_crc32c, the library's only CRC): the SSE4.2 instruction where the CPU has it
// (runtime dispatch), else slicing-by-8 tables. Also kvs_features.
#include <cstring>

#include "kvstore.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define KVS_X86 1
#endif

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

const Tables& tables() {
  static const Tables tb;
  return tb;
}

uint32_t crc_sw(uint32_t c, const uint8_t* p, size_t n) {
  const auto& t = tables().t;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;
    c = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
        t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

#ifdef KVS_X86
// Three independent CRC streams hide the instruction's 3-cycle latency; they are merged
// with the software shift below (crc of zeros), which is cheap relative to the block size.
__attribute__((target("sse4.2"))) uint32_t crc_hw_serial(uint32_t c, const uint8_t* p, size_t n) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = _mm_crc32_u8(c, *p++);
  return c;
}

// Multiplication in GF(2) modulo the reflected polynomial, for combining streams.
uint32_t gf2_mul(uint32_t a, uint32_t b) {
  uint32_t r = 0;
  for (int i = 0; i < 32; ++i) {
    if (b & 0x80000000u) r ^= a;
    b <<= 1;
    a = (a >> 1) ^ (kPoly & (0u - (a & 1u)));
  }
  return r;
}

// x^(8*len) mod P in the reflected domain: the operator that appends len zero bytes.
uint32_t shift_op(size_t len) {
  uint32_t result = 0x80000000u;  // 1
  uint32_t sq = 0x00800000u;      // x^8
  while (len) {
    if (len & 1) result = gf2_mul(result, sq);
    sq = gf2_mul(sq, sq);
    len >>= 1;
  }
  return result;
}

__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t c, const uint8_t* p, size_t n) {
  constexpr size_t kBlock = 8192;  // bytes per stream per round
  if (n < 3 * kBlock) return crc_hw_serial(c, p, n);
  static const uint32_t shift = shift_op(kBlock);
  while (n >= 3 * kBlock) {
    uint64_t a = c, b = 0, d = 0;
    const uint8_t* pa = p;
    const uint8_t* pb = p + kBlock;
    const uint8_t* pd = p + 2 * kBlock;
    for (size_t i = 0; i < kBlock; i += 8) {
      uint64_t wa, wb, wd;
      std::memcpy(&wa, pa + i, 8);
      std::memcpy(&wb, pb + i, 8);
      std::memcpy(&wd, pd + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      d = _mm_crc32_u64(d, wd);
    }
    uint32_t r = gf2_mul(static_cast<uint32_t>(a), shift) ^ static_cast<uint32_t>(b);
    c = gf2_mul(r, shift) ^ static_cast<uint32_t>(d);
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return crc_hw_serial(c, p, n);
}

bool have_sse42() {
  static const bool v = __builtin_cpu_supports("sse4.2");
  return v;
}
#endif

}  // namespace

KVS_API int kvs_features(void) {
  int f = 0;
#ifdef KVS_X86
  if (have_sse42()) f |= KVS_FEATURE_CRC32C_HW;
#endif
  return f;
}

KVS_API uint32_t kvs_crc32c(uint32_t crc, const void* data, size_t len) {
  uint32_t c = ~crc;
  const auto* p = static_cast<const uint8_t*>(data);
#ifdef KVS_X86
  if (have_sse42()) return ~crc_hw(c, p, len);
#endif
  return ~crc_sw(c, p, len);
}

