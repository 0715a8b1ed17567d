// BLAKE2b-256 (RFC 7693, unkeyed, 32-byte digest) and the chained prefix keys of docs/keys.md
// built on it (kvs_prefix_keys). The prefix chain is sequential by construction (key_i hashes
// key_{i-1}), so most of the gain over hashlib is the per-chunk Python work (one hash object,
// three updates, a digest, a slice and a Key per chunk); the unrolled compression function is
// about 10% faster than hashlib's too (bench/key_rate.py).
#include <cstring>

#include "error.h"
#include "kvstore.h"

namespace {

constexpr uint64_t kIV[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                             0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                             0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

constexpr uint8_t kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

inline uint64_t load64(const uint8_t* p) {  // little-endian
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
#else
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
#endif
}

struct State {
  uint64_t h[8];
  uint64_t t = 0;  // bytes compressed so far (messages here stay far below 2^64)
  uint8_t buf[128];
  size_t fill = 0;

  State() {
    std::memcpy(h, kIV, sizeof h);
    h[0] ^= 0x01010000ULL ^ KVS_BLAKE2B_BYTES;  // depth 1, fanout 1, no key, 32-byte digest
  }

  void compress(const uint8_t* block, bool last) {
    uint64_t m[16];
    for (int i = 0; i < 16; ++i) m[i] = load64(block + 8 * i);
    uint64_t v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
    uint64_t v8 = kIV[0], v9 = kIV[1], v10 = kIV[2], v11 = kIV[3];
    uint64_t v12 = kIV[4] ^ t, v13 = kIV[5], v14 = last ? ~kIV[6] : kIV[6], v15 = kIV[7];
    // The twelve rounds unrolled (the schedule indices are constants), state in registers.
#define KVS_G(a, b, c, d, x, y)  \
  a = a + b + (x);               \
  d = rotr(d ^ a, 32);           \
  c = c + d;                     \
  b = rotr(b ^ c, 24);           \
  a = a + b + (y);               \
  d = rotr(d ^ a, 16);           \
  c = c + d;                     \
  b = rotr(b ^ c, 63);
#define KVS_ROUND(r)                                                  \
  KVS_G(v0, v4, v8, v12, m[kSigma[r][0]], m[kSigma[r][1]])            \
  KVS_G(v1, v5, v9, v13, m[kSigma[r][2]], m[kSigma[r][3]])            \
  KVS_G(v2, v6, v10, v14, m[kSigma[r][4]], m[kSigma[r][5]])           \
  KVS_G(v3, v7, v11, v15, m[kSigma[r][6]], m[kSigma[r][7]])           \
  KVS_G(v0, v5, v10, v15, m[kSigma[r][8]], m[kSigma[r][9]])           \
  KVS_G(v1, v6, v11, v12, m[kSigma[r][10]], m[kSigma[r][11]])         \
  KVS_G(v2, v7, v8, v13, m[kSigma[r][12]], m[kSigma[r][13]])          \
  KVS_G(v3, v4, v9, v14, m[kSigma[r][14]], m[kSigma[r][15]])
    KVS_ROUND(0) KVS_ROUND(1) KVS_ROUND(2) KVS_ROUND(3) KVS_ROUND(4) KVS_ROUND(5)
    KVS_ROUND(6) KVS_ROUND(7) KVS_ROUND(8) KVS_ROUND(9) KVS_ROUND(10) KVS_ROUND(11)
#undef KVS_ROUND
#undef KVS_G
    h[0] ^= v0 ^ v8;
    h[1] ^= v1 ^ v9;
    h[2] ^= v2 ^ v10;
    h[3] ^= v3 ^ v11;
    h[4] ^= v4 ^ v12;
    h[5] ^= v5 ^ v13;
    h[6] ^= v6 ^ v14;
    h[7] ^= v7 ^ v15;
  }

  // A full buffer is compressed only once more input follows: the last block is compressed
  // by final() with the finalization flag, even when the message is a multiple of 128 bytes.
  void update(const uint8_t* p, size_t n) {
    while (n) {
      if (fill == sizeof buf) {
        t += sizeof buf;
        compress(buf, false);
        fill = 0;
      }
      if (fill == 0) {
        while (n > sizeof buf) {  // whole blocks straight from the input
          t += sizeof buf;
          compress(p, false);
          p += sizeof buf;
          n -= sizeof buf;
        }
      }
      size_t take = sizeof buf - fill < n ? sizeof buf - fill : n;
      std::memcpy(buf + fill, p, take);
      fill += take;
      p += take;
      n -= take;
    }
  }

  void final(uint8_t* out) {
    t += fill;
    std::memset(buf + fill, 0, sizeof buf - fill);
    compress(buf, true);
    for (int i = 0; i < KVS_BLAKE2B_BYTES; ++i) out[i] = uint8_t(h[i / 8] >> (8 * (i % 8)));
  }
};

}  // namespace

extern "C" {

KVS_API void kvs_blake2b256(const void* data, size_t len, uint8_t* out) {
  State s;
  s.update(static_cast<const uint8_t*>(data), len);
  s.final(out);
}

KVS_API int kvs_prefix_keys(const uint8_t* previous, const void* tokens_le, size_t num_tokens,
                            uint32_t chunk_tokens, uint8_t* out, char* err, size_t err_len) {
  if (chunk_tokens == 0 || previous == nullptr || out == nullptr || (num_tokens && tokens_le == nullptr))
    return kvs::fail(err, err_len, KVS_EINVAL,
                     "kvs_prefix_keys: chunk_tokens must be positive, previous/out/tokens non-null");
  const uint8_t* prev = previous;
  const uint8_t* tok = static_cast<const uint8_t*>(tokens_le);
  for (size_t first = 0; first < num_tokens; first += chunk_tokens) {
    size_t n = num_tokens - first < chunk_tokens ? num_tokens - first : chunk_tokens;
    uint8_t count[4] = {uint8_t(n), uint8_t(n >> 8), uint8_t(n >> 16), uint8_t(n >> 24)};
    State s;
    s.update(prev, KVS_BLAKE2B_BYTES);
    s.update(count, sizeof count);
    s.update(tok + 4 * first, 4 * n);
    s.final(out);  // `previous` was read whole above, so out may start at it
    prev = out;
    out += KVS_BLAKE2B_BYTES;
  }
  return KVS_OK;
}

}  // extern "C"
