// C ABI of the CUDA KV codec (libkvstore_cuda.so). Pointers named dev_* are device
// pointers; `stream` is a cudaStream_t passed as void* (0 = the legacy default stream).
// Bit-exact with the CPU codec for the lossy levels: same input -> same bytes, and each
// decodes the other's output. Lossless bitstreams are decoded on the CPU (KVC_E_ARGUMENT here).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int kvc_cuda_abi_version(void);
// Encode a device-resident chunk; the bitstream is written to host memory `dst`.
int kvc_cuda_encode(const void* dev_src, int dtype, int layout, uint32_t layers, uint32_t tokens,
                    uint32_t heads, uint32_t head_dim, int level, void* stream, uint8_t* dst,
                    uint64_t dst_cap, uint64_t* out_size, char* err, uint64_t err_cap);
// Decode a bitstream resident on the device (dev_buf, n bytes) straight into dev_dst.
// host_head holds a host copy of at least the header + layer index (host_n bytes) which is
// validated on the host; with verify_crc and host_n == n the layer CRCs are checked too.
// The kernel re-validates everything it reads from dev_buf (bounds, states, values).
int kvc_cuda_decode(const uint8_t* host_head, uint64_t host_n, const uint8_t* dev_buf, uint64_t n,
                    void* dev_dst, uint64_t dst_bytes, void* stream, int verify_crc, char* err,
                    uint64_t err_cap);

// Decode `count` bitstreams of one shape and dtype in one kernel launch (more lanes in
// flight: a single 256-token chunk has only layers * 2 * 32 lanes). Arrays are host arrays
// of length count; dev_bufs / dev_dsts hold device pointers.
int kvc_cuda_decode_batch(uint32_t count, const uint8_t* const* host_heads, const uint64_t* host_lens,
                          const uint8_t* const* dev_bufs, const uint64_t* lens, void* const* dev_dsts,
                          uint64_t dst_bytes_each, void* stream, int verify_crc, char* err, uint64_t err_cap);

#ifdef __cplusplus
}
#endif
