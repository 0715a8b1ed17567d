// kvstore native core: C ABI (loaded with ctypes, which releases the GIL around each call).
//
// Conventions: functions return 0 on success or a negative KVS_E* code; functions that can
// fail on input write a NUL-terminated message into (err, err_len) when err is non-null.
#pragma once
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define KVS_API extern "C" __attribute__((visibility("default")))
#else
#define KVS_API extern "C"
#endif

enum {
  KVS_OK = 0,
  KVS_EINVAL = -1,    // malformed input / bad argument
  KVS_ENOSPC = -2,    // destination too small
  KVS_ECORRUPT = -3,  // checksum or structural mismatch
  KVS_EUNSUP = -4,    // unsupported version / feature
  KVS_ECUDA = -5,     // CUDA runtime error
};

// ABI version of this library; bumped on any incompatible change.
KVS_API int kvs_abi_version(void);

// CRC32C (Castagnoli, reflected, init/xorout 0xFFFFFFFF); `crc` is the running value from a
// previous call (0 to start), so crc32c(a||b) == kvs_crc32c(kvs_crc32c(0,a),b).
KVS_API uint32_t kvs_crc32c(uint32_t crc, const void* data, size_t len);

// 1 when the SSE4.2 CRC32 instruction is used.
KVS_API int kvs_crc32c_hw(void);

// memcpy split over `threads` threads (<=1: the calling thread only). For large host copies
// (arena <-> staging) where one core does not reach memory bandwidth.
KVS_API void kvs_copy(void* dst, const void* src, size_t len, int threads);

// Copies `rows` rows of `row_bytes` bytes from `src` (rows `src_pitch` bytes apart) to `dst`
// (rows `dst_pitch` bytes apart): a chunk's [planes, tokens...] block into its columns of a
// [planes, all tokens...] tensor and back, one memcpy per row.
KVS_API void kvs_copy2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t rows,
                        size_t row_bytes);
