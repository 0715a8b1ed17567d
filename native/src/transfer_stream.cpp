// kvs_scatter_stream: kvs_scatter with non-temporal (streaming) stores into the engine's KV.
//
// A load writes far more KV than the caches hold (a 4k-token SmolLM2 prefix is 189 MB), in
// head_bytes pieces (256 B for SmolLM2 fp32). Ordinary stores read every destination line
// before writing it (read-for-ownership), so a scatter moves about 1.5x the bytes a large
// memcpy moves (glibc's memcpy streams large copies). Streaming stores skip that read. Pieces
// whose destination is not 16-byte aligned, or whose length is not a multiple of 16, fall back
// to memcpy; the result is byte-identical to kvs_scatter either way.
#include <cstring>

#include "error.h"
#include "kvstore.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

inline void put(char* dst, const char* src, size_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && (n & 15) == 0) {
    for (size_t i = 0; i < n; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

}  // namespace

KVS_API int kvs_scatter_stream(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                               int tokens, int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride,
                               char* err, size_t err_len) {
  const char* msg = nullptr;
  if (planes <= 0 || tokens < 0 || heads <= 0 || head_bytes <= 0) msg = "planes, heads and head_bytes must be positive";
  else if (!plane_ptrs || (tokens && !slots)) msg = "plane pointers and slots are required";
  else
    for (int t = 0; t < tokens; ++t)
      if (slots[t] < 0) { msg = "slots must be non-negative"; break; }
  if (msg) return kvs::fail(err, err_len, KVS_EINVAL, "%s", msg);
  const auto* in = static_cast<const char*>(chunk);
  const auto n = static_cast<size_t>(head_bytes);
  for (int p = 0; p < planes; ++p) {
    char* base = reinterpret_cast<char*>(plane_ptrs[p]);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < heads; ++h) {
        put(base + slots[t] * token_stride + h * head_stride, in, n);
        in += n;
      }
  }
#if defined(__SSE2__)
  _mm_sfence();  // streamed lines are visible to every core before the caller reads the KV
#endif
  return KVS_OK;
}
