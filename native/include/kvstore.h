// kvstore native core: the one C ABI of libkvstore.so and of its CUDA build libkvstore_cuda.so.
//
// Loaded from Python with ctypes (kvstore_native/_lib.py, the only loader), which releases the
// GIL around each call. One prefix (kvs_), one error scheme, one CRC32C.
//
// Error scheme: every function that can fail returns 0 (KVS_OK) or a negative KVS_E* code and,
// when `err` is non-null and `err_len` > 0, writes a NUL-terminated message into
// err[0 .. err_len). Functions that cannot fail return their value directly.
//
// Library split: libkvstore.so has everything that runs on the CPU (always built);
// libkvstore_cuda.so (built where nvcc exists) has the kvs_cuda_* functions and links
// libkvstore.so for CRC32C. Both export kvs_abi_version(); the loader checks each against
// KVS_ABI_VERSION.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define KVS_EXTERN_C extern "C"
#else
#define KVS_EXTERN_C
#endif
#if defined(__GNUC__)
#define KVS_API KVS_EXTERN_C __attribute__((visibility("default")))
#else
#define KVS_API KVS_EXTERN_C
#endif

// Bumped on any incompatible change of this header (2: one library, one error scheme).
#define KVS_ABI_VERSION 3

// ---- errors ------------------------------------------------------------------------------
#define KVS_OK 0
#define KVS_EINVAL (-1)     // bad caller argument (shape, dtype, level, pointer, size)
#define KVS_ENOSPC (-2)     // destination too small; an `out_size` argument holds the need
#define KVS_ECORRUPT (-3)   // malformed or hostile input data (bitstream structure, header CRC)
#define KVS_ECHECKSUM (-4)  // a payload CRC32C does not match its bytes
#define KVS_EUNSUP (-5)     // unsupported version / feature (e.g. lossless on the GPU)
#define KVS_ECUDA (-6)      // CUDA runtime error
#define KVS_EINTERNAL (-7)  // bug or resource exhaustion inside the library

// ---- library -----------------------------------------------------------------------------
KVS_API int kvs_abi_version(void);

// Bit set of what this build and CPU use.
#define KVS_FEATURE_CRC32C_HW 1  // kvs_crc32c uses the SSE4.2 CRC32 instruction
KVS_API int kvs_features(void);

// ---- keys (docs/keys.md) ------------------------------------------------------------------
#define KVS_BLAKE2B_BYTES 32
// BLAKE2b with a 32-byte digest, no key (RFC 7693): hashlib.blake2b(data, digest_size=32).
KVS_API void kvs_blake2b256(const void* data, size_t len, uint8_t* out);

// The chained prefix keys of `num_tokens` token ids (`tokens_le`: u32 little-endian each):
// key_i = BLAKE2b-256(key_{i-1} || u32le(n_i) || tokens of chunk i), chunk i holding
// `chunk_tokens` tokens (the last one the remainder), key_{-1} = `previous` (32 bytes).
// Writes ceil(num_tokens / chunk_tokens) keys of 32 bytes each to `out`.
KVS_API int kvs_prefix_keys(const uint8_t* previous, const void* tokens_le, size_t num_tokens,
                            uint32_t chunk_tokens, uint8_t* out, char* err, size_t err_len);

// ---- checksums and copies ----------------------------------------------------------------
// CRC32C (Castagnoli, reflected polynomial 0x82F63B78, init/xorout 0xFFFFFFFF) of `len`
// bytes; `crc` is the value of a previous call (0 to start), so
// crc32c(a||b) == kvs_crc32c(kvs_crc32c(0, a), b). Hardware (SSE4.2) when the CPU has it,
// slicing-by-8 tables else.
KVS_API uint32_t kvs_crc32c(uint32_t crc, const void* data, size_t len);

// memcpy split over `threads` threads (<= 1: the calling thread only). For large host copies
// (arena <-> staging) where one core does not reach memory bandwidth.
KVS_API void kvs_copy(void* dst, const void* src, size_t len, int threads);

// Sets `len` bytes at `dst` to zero. Large ranges (>= 256 KiB) use non-temporal stores: the
// lines are written to memory without being read first (a plain memset reads each line it
// writes, twice the memory traffic) and without evicting the cache. For clearing arena
// extents before a client fills them.
KVS_API void kvs_zero(void* dst, size_t len);

// Copies `rows` rows of `row_bytes` bytes from `src` (rows `src_pitch` bytes apart) to `dst`
// (rows `dst_pitch` bytes apart): a chunk's [planes, tokens...] block into its columns of a
// [planes, all tokens...] tensor and back, one memcpy per row.
KVS_API void kvs_copy2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t rows,
                        size_t row_bytes);

// kvs_copy2d that also returns the CRC32C (continuing from `crc`, 0 to start) of the bytes it
// wrote, rows in order: one pass over memory instead of a copy then a checksum. The CRC is
// computed over `dst` right after each block lands (cache-hot), so it covers what was written.
// Added in ABI 2 without a version change (a new symbol).
KVS_API uint32_t kvs_copy2d_crc32c(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t rows,
                                   size_t row_bytes, uint32_t crc);

// ---- paged-KV gather/scatter ---------------------------------------------------------------
// Between an engine's KV memory and the chunk layout [planes, tokens, heads, head_bytes]
// (planes = layers * 2 for K/V, layers for MLA). The engine side is described in bytes, so one
// routine serves every engine layout and dtype: element (plane p, token t, head h) starts at
//     plane_ptrs[p] + slots[t] * token_stride + h * head_stride
// and is head_bytes long. Examples:
//   vLLM paged [blocks, block_size, heads, dim]: slot = block * block_size + offset,
//       token_stride = heads*dim*elt, head_stride = dim*elt
//   HF DynamicCache [1, heads, seq, dim]: slot = position, token_stride = dim*elt,
//       head_stride = seq_capacity*dim*elt
// The chunk side is contiguous: ((p * tokens + t) * heads + h) * head_bytes.

// CPU implementations (host pointers), the reference for the CUDA ones.
KVS_API int kvs_gather(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads,
                       int64_t head_bytes, int64_t token_stride, int64_t head_stride, void* chunk, char* err,
                       size_t err_len);
KVS_API int kvs_scatter(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens,
                        int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride, char* err,
                        size_t err_len);
// kvs_scatter with non-temporal stores (for loads much larger than the caches: no
// read-for-ownership of the destination); byte-identical result.
KVS_API int kvs_scatter_stream(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                               int tokens, int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride,
                               char* err, size_t err_len);

// Tile gather/scatter (CPU): planes with their own row and element strides, e.g. vLLM-CPU's
// CPU_ATTN tiles, whose K is dim-major ([D, N] per block and head) and V token-major. Element
// (p, t, h, e) of the engine side is at plane_ptrs[p] + block_offs[t] + rows[t] * row_strides[p]
// + h * head_stride + e * elem_strides[p] (bytes); the chunk side is contiguous as above, with
// head_bytes = head_elems * elem_bytes (elem_bytes 1, 2, 4 or 8). streaming (scatter): non-temporal
// stores where aligned, for loads larger than the caches; the bytes written are the same.
KVS_API int kvs_scatter_tiles(const void* chunk, const uint64_t* plane_ptrs, const int64_t* row_strides,
                              const int64_t* elem_strides, int planes, const int64_t* block_offs, const int64_t* rows,
                              int tokens, int heads, int head_elems, int elem_bytes, int64_t head_stride,
                              int streaming, char* err, size_t err_len);
KVS_API int kvs_gather_tiles(const uint64_t* plane_ptrs, const int64_t* row_strides, const int64_t* elem_strides,
                             int planes, const int64_t* block_offs, const int64_t* rows, int tokens, int heads,
                             int head_elems, int elem_bytes, int64_t head_stride, void* chunk, char* err,
                             size_t err_len);

// CUDA implementations (libkvstore_cuda.so): plane_ptrs and slots are HOST arrays (copied to
// the device by the call); the engine memory is device memory; `chunk` is device memory or
// host memory the device can address (cudaHostRegister'ed / pinned). `stream` is a
// cudaStream_t (0: default). Asynchronous on `stream` except for the small argument upload.
KVS_API int kvs_cuda_gather(const uint64_t* plane_ptrs, int planes, const int64_t* slots, int tokens, int heads,
                            int64_t head_bytes, int64_t token_stride, int64_t head_stride, void* chunk, void* stream,
                            char* err, size_t err_len);
KVS_API int kvs_cuda_scatter(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                             int tokens, int heads, int64_t head_bytes, int64_t token_stride, int64_t head_stride,
                             void* stream, char* err, size_t err_len);
// kvs_cuda_scatter that writes nothing unless gate_index < *gate (`gate`: device memory the
// stream reads when the kernel runs, e.g. a prefix proven by kvs_cuda_prove_prefix).
KVS_API int kvs_cuda_scatter_gated(const void* chunk, const uint64_t* plane_ptrs, int planes, const int64_t* slots,
                                   int tokens, int heads, int64_t head_bytes, int64_t token_stride,
                                   int64_t head_stride, const int32_t* gate, int32_t gate_index, void* stream,
                                   char* err, size_t err_len);

// ---- KV codec (docs/bitstream.md) ------------------------------------------------------------
// Shapes: layout 1 = [layers, 2, tokens, heads, head_dim], layout 2 (MLA) = [layers, tokens,
// head_dim] with heads == 1. dtype 1 fp16, 2 bf16, 3 fp32. level 0 lossless .. 3 aggressive.
typedef struct {
  uint32_t version;
  uint32_t codec, level, dtype, layout;
  uint32_t layers, tokens, heads, head_dim;
  uint64_t payload_size;    // bytes after header + index
  uint64_t decoded_bytes;   // size of the decoded chunk
  uint64_t payload_offset;  // header + index bytes
  uint32_t lanes;           // rANS lanes per lossy segment (32, 64 or 128; 32 for lossless)
} kvs_codec_info;

// Upper bound of the encoded size (a safe output capacity).
KVS_API uint64_t kvs_codec_encode_bound(int dtype, int layout, uint32_t layers, uint32_t tokens, uint32_t heads,
                                        uint32_t head_dim, int level);
// Encodes one chunk of `src_bytes` bytes. `policy` (NULL = the level's default) is 8 int32
// {K offset shallow, middle, deep, V offset shallow, middle, deep, K weight, V weight}
// (docs/bitstream.md, "Encoder policy"); the bitstream does not depend on it. `lanes`: rANS lanes
// per lossy segment, 32, 64 or 128 (0 = 32; lossless: 0 or 32); more lanes decode with more
// parallelism on a GPU for 8 more bytes per lane and segment. KVS_ENOSPC
// when dst_cap is too small (*out_size then holds the size needed).
KVS_API int kvs_codec_encode(const void* src, uint64_t src_bytes, int dtype, int layout, uint32_t layers,
                             uint32_t tokens, uint32_t heads, uint32_t head_dim, int level, int lanes,
                             const int32_t* policy, int threads, uint8_t* dst, uint64_t dst_cap, uint64_t* out_size, char* err,
                             size_t err_len);
// Validates header and index (not the payload) and fills *info (may be NULL).
KVS_API int kvs_codec_parse(const uint8_t* buf, uint64_t n, kvs_codec_info* info, char* err, size_t err_len);
// Decodes layers [first, first + count) into dst (count layers of decoded elements). With
// `verify`, each layer's CRC32C is checked first (KVS_ECHECKSUM on mismatch).
KVS_API int kvs_codec_decode_layers(const uint8_t* buf, uint64_t n, uint32_t first, uint32_t count, void* dst,
                                    uint64_t dst_bytes, int threads, int verify, char* err, size_t err_len);
// Byte sizes of every layer's payload by role, for metadata accounting:
// out3[0] = channel/plane tables, out3[1] = lane tables, out3[2] = lane data.
KVS_API int kvs_codec_size_breakdown(const uint8_t* buf, uint64_t n, uint64_t* out3, char* err, size_t err_len);
// Test hook: the codec's portable float -> fp16 (dtype 1) / bf16 (dtype 2) conversion.
KVS_API void kvs_codec_debug_convert(const float* in, uint16_t* out, uint64_t n, int dtype);

// CUDA codec (libkvstore_cuda.so), lossy levels only (lossless: KVS_EINVAL), bit-exact with
// the CPU codec: same input -> same bytes, and each decodes the other's output. Pointers named
// dev_* are device pointers; `stream` is a cudaStream_t (0 = the legacy default stream).
//
// Encodes a device-resident chunk; the bitstream is written to host memory `dst`.
KVS_API int kvs_cuda_codec_encode(const void* dev_src, int dtype, int layout, uint32_t layers, uint32_t tokens,
                                  uint32_t heads, uint32_t head_dim, int level, void* stream, uint8_t* dst,
                                  uint64_t dst_cap, uint64_t* out_size, char* err, size_t err_len);
// Decodes a bitstream resident on the device (dev_buf, n bytes) straight into dev_dst.
// host_head holds a host copy of at least the header + layer index (host_n bytes), validated
// on the host; with verify_crc and host_n == n the layer CRCs are checked too. The kernel
// re-validates everything it reads from dev_buf (bounds, states, values).
KVS_API int kvs_cuda_codec_decode(const uint8_t* host_head, uint64_t host_n, const uint8_t* dev_buf, uint64_t n,
                                  void* dev_dst, uint64_t dst_bytes, void* stream, int verify_crc, char* err,
                                  size_t err_len);
// Decodes `count` bitstreams of one shape and dtype in one kernel launch. Arrays are host
// arrays of length count; dev_bufs / dev_dsts hold device pointers.
KVS_API int kvs_cuda_codec_decode_batch(uint32_t count, const uint8_t* const* host_heads, const uint64_t* host_lens,
                                        const uint8_t* const* dev_bufs, const uint64_t* lens, void* const* dev_dsts,
                                        uint64_t dst_bytes_each, void* stream, int verify_crc, char* err,
                                        size_t err_len);

// Compressed load: `count` bitstreams in HOST memory (host_bufs[i], lens[i] bytes; pinned or
// cudaHostRegister'ed for asynchronous copies) cross PCIe in `groups` groups on the library's
// copy stream and are decoded on `stream` into dev_dsts[i] (dst_bytes_each each), group g
// decoding while group g+1 is copied (groups 0: one group per wave of the decoder). Headers
// and indexes are validated on the host; verify_crc: every layer's CRC32C is computed on the
// GPU and compared. Returns after the stream has synchronized.
KVS_API int kvs_cuda_codec_load_batch(uint32_t count, const uint8_t* const* host_bufs, const uint64_t* lens,
                                      void* const* dev_dsts, uint64_t dst_bytes_each, uint32_t groups, void* stream,
                                      int verify_crc, char* err, size_t err_len);
// Compressed load straight into engine memory, proven before it is placed. `count` bitstreams
// in HOST memory (host_bufs[i], lens[i] bytes; pinned or registered for asynchronous copies)
// cross PCIe in `groups` groups (0: two per decoder wave) on the library's copy stream. On the
// GPU each group's bitstreams get their CRC32C over the bytes that landed and are decoded,
// consecutive groups on two streams side by side, chunk i only when the CRC32Cs of chunks 0..i
// all equal want_crcs (null: no check); a chunk gated out writes nothing. Nothing of host_bufs
// is read on the host (it may change under the call) unless verify_host: then headers, indexes
// and layer CRCs are validated there first, and the first chunk refused ends the load. Each
// header is checked on the device against the expected chunk (dtype, layout, layers, tokens,
// heads, head_dim; lossy levels). Element (segment p = layer * S + k, token t, channel c) of
// chunk i goes to the device address
//   plane_ptrs[i * layers * S + p] + token_offs[i * tokens + t]
//     + (c / run_elems) * run_stride + (c % run_elems) * element_size
// (S = 2 for KV, 1 for MLA; e.g. a vLLM paged cache: token_offs = slot * token stride, runs of
// head_dim channels every head stride). Returns after `stream` synchronized; *proven = the
// leading chunks whose CRC32C matched (count without want_crcs), *failed = the first chunk
// that did not decode or that the host check refused (count if none): chunks below
// min(*proven, *failed) are placed. KVS_ECORRUPT (with the message) when *failed < *proven.
KVS_API int kvs_cuda_codec_load_mapped(uint32_t count, const uint8_t* const* host_bufs, const uint64_t* lens,
                                       const uint32_t* want_crcs, int dtype, int layout, uint32_t layers,
                                       uint32_t tokens, uint32_t heads, uint32_t head_dim, const uint64_t* plane_ptrs,
                                       const uint64_t* token_offs, uint32_t run_elems, uint64_t run_stride,
                                       uint32_t groups, void* stream, int verify_host, uint32_t* proven,
                                       uint32_t* failed, char* err, size_t err_len);
// Encodes `count` device-resident chunks of one shape (dev_srcs[i]) in one pass of batched
// kernels; the bitstreams go to host memory `dst` (pinned for speed), chunk i at out_offsets[i]
// with out_sizes[i] bytes (16-byte aligned, in order). KVS_ENOSPC when dst_cap is too small:
// out_sizes then hold the sizes needed (dst untouched). Layer CRCs are computed on the GPU.
// `lanes`: rANS lanes per segment, 32, 64 or 128 (0 = 32), as kvs_codec_encode.
KVS_API int kvs_cuda_codec_encode_batch(uint32_t count, const uint64_t* dev_srcs, int dtype, int layout, uint32_t layers,
                                        uint32_t tokens, uint32_t heads, uint32_t head_dim, int level, int lanes, void* stream,
                                        uint8_t* dst, uint64_t dst_cap, uint64_t* out_offsets, uint64_t* out_sizes,
                                        char* err, size_t err_len);
// The encoder of kvs_cuda_codec_encode_batch writing each bitstream where the caller names it
// once the sizes are known (e.g. extents reserved in a shared arena for exactly those sizes):
// with the payloads assembled and checksummed on the GPU in flight, place(ctx, count, sizes,
// dsts) is called on this thread; it fills dsts[i] with a host pointer of sizes[i] writable
// bytes (pinned or registered for speed; 0 skips chunk i) and returns 0, or nonzero to abandon
// the encode (KVS_EINVAL). On success blob_crcs[i] is the CRC32C of bitstream i as written.
typedef int (*kvs_place_fn)(void* ctx, uint32_t count, const uint64_t* sizes, uint64_t* dsts);
KVS_API int kvs_cuda_codec_encode_batch_placed(uint32_t count, const uint64_t* dev_srcs, int dtype, int layout,
                                               uint32_t layers, uint32_t tokens, uint32_t heads, uint32_t head_dim,
                                               int level, int lanes, void* stream, kvs_place_fn place, void* ctx,
                                               uint64_t* out_sizes, uint32_t* blob_crcs, char* err, size_t err_len);
// Decoder choice of kvs_cuda_codec_decode(_batch) and load_batch (tests and benchmarks): 0 = the
// first decoder (one thread per lane, grid row per chunk; load_batch then uses 5), 1 = one warp
// per segment with the models in shared memory, 2 = same with the hardware fp16/bf16 conversion,
// 3/4 = models in global memory (portable / hardware conversion), 5 = 2 with a shorter symbol
// chain (both model entries loaded at once, token offsets read ahead; the default);
// warps_per_block 1..8 (default 4). Every variant is bit-exact with the CPU codec.
KVS_API int kvs_cuda_codec_set_decoder(int variant, int warps_per_block, char* err, size_t err_len);
// Statistics pass of the batched GPU encoder (tests and benchmarks): 0 = per-channel passes over
// global memory (k_plan_b), 1 = the segment staged once in shared memory (k_plan_tile; fp16 and
// bf16 segments up to 110 KB, the global pass otherwise; default). Both give the CPU encoder's bytes.
KVS_API int kvs_cuda_codec_set_encoder(int variant, char* err, size_t err_len);
// Counts, over every non-NaN binary32 value, where the hardware fp16 / bf16 conversions differ
// from the format's portable ones (0 and 0 make variants 2 and 4 bit-exact).
KVS_API int kvs_cuda_codec_selftest(uint64_t* mismatches_f16, uint64_t* mismatches_bf16, char* err, size_t err_len);

// ---- CUDA batch copies, checksums, pools, IPC (libkvstore_cuda.so, cuda/batch.cu) ---------
// CRC32C of `count` buffers (ptrs/lens are HOST arrays; each buffer is device memory or
// host memory the device can address), bit-exact with kvs_crc32c(0, buf, len). out[count] is
// device memory or registered/pinned host memory, written by a kernel: asynchronous on
// `stream`; read it after the stream synchronizes. Costs two launches for the whole batch.
KVS_API int kvs_cuda_crc32c_batch(uint32_t count, const uint64_t* ptrs, const uint64_t* lens, uint32_t* out,
                                  void* stream, char* err, size_t err_len);
// crc32c(A || B) from crc32c(A), crc32c(B) and |B| (host; the GPU kernels' combine rule).
KVS_API uint32_t kvs_cuda_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);
// out[g] = crc32c of the concatenation of `per_group` buffers of `len_each` bytes each whose
// CRCs are crcs[g*per_group ..] (e.g. the planes of a chunk checksummed row by row on the GPU).
KVS_API void kvs_cuda_crc32c_fold(const uint32_t* crcs, uint64_t per_group, uint64_t len_each, uint64_t groups,
                             uint32_t* out);
// Copy-engine copies (cudaMemcpyDefault: any mix of device and registered host memory),
// asynchronous on `stream`, no SM time. A batch of `count` copies (HOST arrays).
KVS_API int kvs_cuda_memcpy_batch(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                                  void* stream, char* err, size_t err_len);
// `height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` bytes apart (cudaMemcpy2DAsync).
KVS_API int kvs_cuda_memcpy2d(uint64_t dst, uint64_t dst_pitch, uint64_t src, uint64_t src_pitch, uint64_t width,
                              uint64_t height, void* stream, char* err, size_t err_len);
// SM-kernel form of a batch of 2D copies with one shape: job i moves `height` rows of `width`
// bytes from srcs[i] (rows src_pitch apart) to dsts[i] (rows dst_pitch apart); one launch for
// all jobs. For device-to-device moves (HBM-tier loads, decoded chunks into the engine's
// tensor), where it outruns cudaMemcpy2DAsync; falls back to the copy engine when any address,
// pitch or width is not 16-byte aligned. dsts/srcs are HOST arrays.
KVS_API int kvs_cuda_copy_rows(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, uint64_t dst_pitch,
                               uint64_t src_pitch, uint64_t width, uint64_t height, void* stream, char* err,
                               size_t err_len);
// kvs_cuda_copy_rows that skips job i unless first + i < *gate (`gate`: device memory read when
// the kernel runs). Needs 16-byte alignment (no copy-engine fallback: EINVAL otherwise).
KVS_API int kvs_cuda_copy_rows_gated(uint32_t count, const uint64_t* dsts, const uint64_t* srcs, uint64_t dst_pitch,
                                     uint64_t src_pitch, uint64_t width, uint64_t height, const int32_t* gate,
                                     int32_t first, void* stream, char* err, size_t err_len);
// A prefix proven on the device: when *gate == first (every chunk before `first` proven),
// *gate becomes first + the number of leading i < count with got[i] == want[i]; otherwise it
// is left as it is, so the first mismatch ends the prefix for every later launch on the stream.
// `got`: device or pinned memory (e.g. kvs_cuda_crc32c_batch's out, written earlier on the
// stream); `want`: a HOST array (carried in the launch); `gate`: device memory. Asynchronous.
KVS_API int kvs_cuda_prove_prefix(uint32_t count, const uint32_t* got, const uint32_t* want, int32_t* gate,
                                  int32_t first, void* stream, char* err, size_t err_len);
KVS_API int kvs_cuda_stream_sync(void* stream, char* err, size_t err_len);
KVS_API int kvs_cuda_device_count(int* count, char* err, size_t err_len);
KVS_API int kvs_cuda_set_device(int device, char* err, size_t err_len);
// Page-locks host memory for the device (an already registered range is not an error).
KVS_API int kvs_cuda_host_register(uint64_t ptr, uint64_t bytes, char* err, size_t err_len);
KVS_API int kvs_cuda_host_unregister(uint64_t ptr, char* err, size_t err_len);
// Device memory of the current device (plain cudaMalloc: IPC-exportable).
KVS_API int kvs_cuda_malloc(uint64_t bytes, uint64_t* ptr, char* err, size_t err_len);
KVS_API int kvs_cuda_free(uint64_t ptr, char* err, size_t err_len);
// CUDA IPC: the handle of an allocation's base pointer (KVS_CUDA_IPC_HANDLE_BYTES bytes), and
// its mapping in another process of the same GPU (close with kvs_cuda_ipc_close; the driver
// unmaps it when the process dies).
#define KVS_CUDA_IPC_HANDLE_BYTES 64
KVS_API int kvs_cuda_ipc_get_handle(uint64_t ptr, uint8_t* handle, char* err, size_t err_len);
KVS_API int kvs_cuda_ipc_open(const uint8_t* handle, uint64_t* ptr, char* err, size_t err_len);
KVS_API int kvs_cuda_ipc_close(uint64_t ptr, char* err, size_t err_len);
