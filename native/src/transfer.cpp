// CPU reference of the paged-KV gather/scatter (kvstore.h, "paged-KV gather/scatter").
#include <cstring>

#include "error.h"
#include "kvstore.h"

namespace {

int check(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads, int64_t head_bytes,
          char* err, size_t err_len) {
  const char* msg = nullptr;
  if (planes <= 0 || tokens < 0 || heads <= 0 || head_bytes <= 0) msg = "planes, heads and head_bytes must be positive";
  else if (!plane_ptrs || (tokens && !slots)) msg = "plane pointers and slots are required";
  else {
    for (int t = 0; t < tokens; ++t)
      if (slots[t] < 0) { msg = "slots must be non-negative"; break; }
  }
  if (msg) return kvs::fail(err, err_len, KVS_EINVAL, "%s", msg);
  return KVS_OK;
}

}  // namespace

KVS_API int kvs_gather(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads,
                       int64_t head_bytes, int64_t token_stride, int64_t head_stride, void* chunk, char* err,
                       size_t err_len) {
  int rc = check(plane_ptrs, planes, slots, tokens, heads, head_bytes, err, err_len);
  if (rc) return rc;
  auto* out = static_cast<char*>(chunk);
  for (int p = 0; p < planes; ++p) {
    const char* base = reinterpret_cast<const char*>(plane_ptrs[p]);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < heads; ++h) {
        std::memcpy(out, base + slots[t] * token_stride + h * head_stride, static_cast<size_t>(head_bytes));
        out += head_bytes;
      }
  }
  return KVS_OK;
}

KVS_API int kvs_scatter(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens,
                        int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride, char* err,
                        size_t err_len) {
  int rc = check(plane_ptrs, planes, slots, tokens, heads, head_bytes, err, err_len);
  if (rc) return rc;
  const auto* in = static_cast<const char*>(chunk);
  for (int p = 0; p < planes; ++p) {
    char* base = reinterpret_cast<char*>(plane_ptrs[p]);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < heads; ++h) {
        std::memcpy(base + slots[t] * token_stride + h * head_stride, in, static_cast<size_t>(head_bytes));
        in += head_bytes;
      }
  }
  return KVS_OK;
}
