// Host copies: kvs_copy (memcpy over threads), kvs_copy2d (pitched rows) and
// kvs_copy2d_crc32c (pitched rows, checksumming what was written in the same pass); kvs_zero.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "kvstore.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

KVS_API void kvs_zero(void* dst, size_t len) {
  auto* p = static_cast<char*>(dst);
#if defined(__x86_64__) || defined(_M_X64)
  constexpr size_t kStreamFrom = size_t(256) << 10;
  if (len >= kStreamFrom) {
    size_t head = (64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63;  // to a cache-line boundary
    std::memset(p, 0, head);
    p += head;
    len -= head;
    const __m128i z = _mm_setzero_si128();
    size_t lines = len / 64;
    for (size_t i = 0; i < lines; ++i, p += 64) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), z);
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + 16), z);
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + 32), z);
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + 48), z);
    }
    _mm_sfence();  // the streamed stores are visible before anyone is told the range is clear
    len -= lines * 64;
  }
#endif
  std::memset(p, 0, len);
}

KVS_API void kvs_copy(void* dst, const void* src, size_t len, int threads) {
  constexpr size_t kMinPerThread = size_t(4) << 20;  // below 4 MiB a thread costs more than it saves
  if (threads <= 1 || len < 2 * kMinPerThread) {
    std::memcpy(dst, src, len);
    return;
  }
  size_t n = std::min<size_t>(static_cast<size_t>(threads), len / kMinPerThread);
  size_t per = (len / n + 4095) & ~size_t(4095);
  std::vector<std::thread> pool;
  for (size_t i = 1; i < n; ++i) {
    size_t off = i * per;
    if (off >= len) break;
    size_t sz = std::min(per, len - off);
    pool.emplace_back([=] { std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, sz); });
  }
  std::memcpy(dst, src, std::min(per, len));
  for (auto& t : pool) t.join();
}

KVS_API void kvs_copy2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t rows,
                        size_t row_bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  for (size_t r = 0; r < rows; ++r) std::memcpy(d + r * dst_pitch, s + r * src_pitch, row_bytes);
}

KVS_API uint32_t kvs_copy2d_crc32c(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t rows,
                                   size_t row_bytes, uint32_t crc) {
  // Blocks small enough to stay in L2 between the copy and the checksum, so the bytes are
  // read from memory once and the CRC covers exactly what landed in `dst`.
  constexpr size_t kBlock = size_t(128) << 10;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  for (size_t r = 0; r < rows; ++r) {
    char* drow = d + r * dst_pitch;
    const char* srow = s + r * src_pitch;
    for (size_t off = 0; off < row_bytes; off += kBlock) {
      size_t n = std::min(kBlock, row_bytes - off);
      std::memcpy(drow + off, srow + off, n);
      crc = kvs_crc32c(crc, drow + off, n);
    }
  }
  return crc;
}
