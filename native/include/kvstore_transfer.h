// Paged-KV gather/scatter between an engine's KV memory and the chunk layout
// [planes, tokens, heads, head_bytes] (planes = layers * 2 for K/V, layers for MLA).
//
// The engine side is described generically, in bytes, so one routine serves every engine
// layout and dtype: the element (plane p, token t, head h) starts at
//     plane_ptrs[p] + slots[t] * token_stride + h * head_stride
// and is head_bytes long. Examples:
//   vLLM paged [blocks, block_size, heads, dim]: slot = block * block_size + offset,
//       token_stride = heads*dim*elt, head_stride = dim*elt
//   HF DynamicCache [1, heads, seq, dim]: slot = position, token_stride = dim*elt,
//       head_stride = seq_capacity*dim*elt
// The chunk side is contiguous: ((p * tokens + t) * heads + h) * head_bytes.
#pragma once
#include "kvstore_native.h"

// CPU implementations (host pointers), the reference for the CUDA ones.
KVS_API int kvs_gather(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads,
                       int64_t head_bytes, int64_t token_stride, int64_t head_stride, void* chunk, char* err,
                       size_t err_len);
KVS_API int kvs_scatter(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens,
                        int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride, char* err,
                        size_t err_len);

// CUDA implementations: plane_ptrs and slots are HOST arrays (copied to the device by the
// call); the engine memory is device memory; `chunk` is device memory or host memory the
// device can address (cudaHostRegister'ed / pinned). `stream` is a cudaStream_t (0: default).
// The call is asynchronous on `stream` except for the small argument upload.
KVS_API int kvs_cuda_gather(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads,
                            int64_t head_bytes, int64_t token_stride, int64_t head_stride, void* chunk, void* stream,
                            char* err, size_t err_len);
KVS_API int kvs_cuda_scatter(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                             int tokens, int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride,
                             void* stream, char* err, size_t err_len);
