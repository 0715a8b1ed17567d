// C ABI of the KV codec (loaded from Python with ctypes, which releases the GIL).
// Every function returns a KVC_* status; on failure a NUL-terminated message is written to
// err (capacity err_cap). Shapes: layout 1 = [layers, 2, tokens, heads, head_dim],
// layout 2 (MLA) = [layers, tokens, head_dim] with heads == 1.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  uint32_t version;
  uint32_t codec, level, dtype, layout;
  uint32_t layers, tokens, heads, head_dim;
  uint64_t payload_size;   // bytes after header + index
  uint64_t decoded_bytes;  // size of the decoded chunk
  uint64_t payload_offset; // header + index bytes
} kvc_info;

int kvc_abi_version(void);
uint32_t kvc_crc32c(const void* data, uint64_t n, uint32_t crc);
// Upper bound of the encoded size (a safe output capacity).
uint64_t kvc_encode_bound(int dtype, int layout, uint32_t layers, uint32_t tokens, uint32_t heads,
                          uint32_t head_dim, int level);
int kvc_encode(const void* src, uint64_t src_bytes, int dtype, int layout, uint32_t layers,
               uint32_t tokens, uint32_t heads, uint32_t head_dim, int level, int threads,
               uint8_t* dst, uint64_t dst_cap, uint64_t* out_size, char* err, uint64_t err_cap);
// As kvc_encode with an explicit encoder policy (NULL = the level's default): 8 int32
// {K offset shallow, middle, deep, V offset shallow, middle, deep, K weight, V weight}
// (docs/bitstream.md, "Encoder policy"). The bitstream does not depend on the policy.
int kvc_encode_policy(const void* src, uint64_t src_bytes, int dtype, int layout, uint32_t layers,
                      uint32_t tokens, uint32_t heads, uint32_t head_dim, int level, const int32_t* policy,
                      int threads, uint8_t* dst, uint64_t dst_cap, uint64_t* out_size, char* err,
                      uint64_t err_cap);
// Test hook: the portable float -> fp16 (dtype 1) / bf16 (dtype 2) conversion of the codec.
void kvc_debug_convert(const float* in, uint16_t* out, uint64_t n, int dtype);
int kvc_parse(const uint8_t* buf, uint64_t n, kvc_info* info, char* err, uint64_t err_cap);
// Decode layers [first, first + count) into dst (count layers of decoded elements).
int kvc_decode_layers(const uint8_t* buf, uint64_t n, uint32_t first, uint32_t count, void* dst,
                      uint64_t dst_bytes, int threads, int verify, char* err, uint64_t err_cap);
// Byte sizes of every layer's payload and its symbols, for metadata accounting:
// out[0] = total channel/plane tables, out[1] = lane tables, out[2] = lane data.
int kvc_size_breakdown(const uint8_t* buf, uint64_t n, uint64_t* out3, char* err, uint64_t err_cap);

#ifdef __cplusplus
}
#endif
