// kvs_scatter_tiles / kvs_gather_tiles: paged KV whose planes each have their own row and
// element strides (kvstore.h, "tile gather/scatter").
//
// vLLM-CPU's CPU_ATTN tiles keep K dim-major ([D, N] per block and head: all tokens of
// dimension 0, then of dimension 1, ...) and V token-major ([N, D]), so a chunk's K crosses
// a transpose on the way in and out, and K and V planes have different strides. Element
// (plane p, token t, head h, element e) of the engine side lives at
//   plane_ptrs[p] + block_offs[t] + rows[t] * row_strides[p] + h * head_stride + e * elem_strides[p]
// and the chunk side is contiguous: (((p * tokens + t) * heads + h) * head_elems + e) * elem_bytes.
//
// A plane whose elements are adjacent (elem_stride == elem_bytes) moves a head vector per
// memcpy. A transposed plane moves GROUP tokens at a time: for each head and element the
// GROUP values land in consecutive destination elements (one cache line for 16 fp32 values
// of consecutive rows) while their sources, GROUP rows of the chunk, stay in L1.
#include <cstdint>
#include <cstring>

#include "error.h"
#include "kvstore.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

constexpr int GROUP = 16;

#if defined(__SSE2__)
// 4-byte elements, GROUP consecutive rows of one block (row_stride == 4, so a dimension's
// GROUP values are one 64-byte run), head_elems a multiple of 4: 4x4 register transposes,
// 16-byte loads and stores, no per-element address arithmetic.
template <bool TO_ENGINE, bool STREAM>
inline void group_f32(char* eng, float* chunk, int64_t token_elems, int head_elems, int64_t elem_stride) {
  for (int e0 = 0; e0 < head_elems; e0 += 4)
    for (int i0 = 0; i0 < GROUP; i0 += 4) {
      float* c = chunk + i0 * token_elems + e0;         // row i0 + j at c + j * token_elems
      char* d = eng + static_cast<int64_t>(e0) * elem_stride + i0 * 4;   // dim e0 + j at d + j * elem_stride
      if (TO_ENGINE) {
        __m128 r0 = _mm_loadu_ps(c), r1 = _mm_loadu_ps(c + token_elems), r2 = _mm_loadu_ps(c + 2 * token_elems),
               r3 = _mm_loadu_ps(c + 3 * token_elems);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        if (STREAM) {   // 16-byte aligned (checked by the caller): no read-for-ownership
          _mm_stream_ps(reinterpret_cast<float*>(d), r0);
          _mm_stream_ps(reinterpret_cast<float*>(d + elem_stride), r1);
          _mm_stream_ps(reinterpret_cast<float*>(d + 2 * elem_stride), r2);
          _mm_stream_ps(reinterpret_cast<float*>(d + 3 * elem_stride), r3);
        } else {
          _mm_storeu_ps(reinterpret_cast<float*>(d), r0);
          _mm_storeu_ps(reinterpret_cast<float*>(d + elem_stride), r1);
          _mm_storeu_ps(reinterpret_cast<float*>(d + 2 * elem_stride), r2);
          _mm_storeu_ps(reinterpret_cast<float*>(d + 3 * elem_stride), r3);
        }
      } else {
        __m128 r0 = _mm_loadu_ps(reinterpret_cast<const float*>(d)),
               r1 = _mm_loadu_ps(reinterpret_cast<const float*>(d + elem_stride)),
               r2 = _mm_loadu_ps(reinterpret_cast<const float*>(d + 2 * elem_stride)),
               r3 = _mm_loadu_ps(reinterpret_cast<const float*>(d + 3 * elem_stride));
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _mm_storeu_ps(c, r0);
        _mm_storeu_ps(c + token_elems, r1);
        _mm_storeu_ps(c + 2 * token_elems, r2);
        _mm_storeu_ps(c + 3 * token_elems, r3);
      }
    }
}
#endif

int check(const uint64_t* plane_ptrs, const int64_t* row_strides, const int64_t* elem_strides, int planes,
          const int64_t* block_offs, const int64_t* rows, int tokens, int heads, int head_elems, int elem_bytes,
          char* err, size_t err_len) {
  const char* msg = nullptr;
  if (planes <= 0 || tokens < 0 || heads <= 0 || head_elems <= 0) msg = "planes, heads and head_elems must be positive";
  else if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) msg = "elem_bytes must be 1, 2, 4 or 8";
  else if (!plane_ptrs || !row_strides || !elem_strides) msg = "plane pointers and strides are required";
  else if (tokens && (!block_offs || !rows)) msg = "block offsets and rows are required";
  else {
    for (int t = 0; t < tokens && !msg; ++t)
      if (block_offs[t] < 0 || rows[t] < 0) msg = "block offsets and rows must be non-negative";
    for (int p = 0; p < planes && !msg; ++p)
      if (row_strides[p] <= 0 || elem_strides[p] <= 0) msg = "row and element strides must be positive";
  }
  if (msg) return kvs::fail(err, err_len, KVS_EINVAL, "%s", msg);
  return KVS_OK;
}

// A head vector into the engine; streaming: non-temporal 16-byte stores where aligned.
inline void put(char* dst, const char* src, size_t n, bool streaming) {
#if defined(__SSE2__)
  if (streaming && (reinterpret_cast<uintptr_t>(dst) & 15) == 0 && (n & 15) == 0) {
    for (size_t i = 0; i < n; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// One plane, transposed side strided: TO_ENGINE scatters chunk -> engine, else gathers.
template <typename T, bool TO_ENGINE>
void strided_plane(char* engine, const char* chunk_in, char* chunk_out, const int64_t* block_offs, const int64_t* rows,
                   int tokens, int heads, int head_elems, int64_t row_stride, int64_t elem_stride, int64_t head_stride,
                   bool streaming) {
  const int64_t token_elems = static_cast<int64_t>(heads) * head_elems;
  int64_t base[GROUP];
  for (int t0 = 0; t0 < tokens; t0 += GROUP) {
    const int g = tokens - t0 < GROUP ? tokens - t0 : GROUP;
    bool run = g == GROUP;     // GROUP consecutive rows of one block
    for (int i = 0; i < g; ++i) {
      base[i] = block_offs[t0 + i] + rows[t0 + i] * row_stride;
      run = run && base[i] == base[0] + i * row_stride;
    }
#if defined(__SSE2__)
    if (sizeof(T) == 4 && run && row_stride == 4 && head_elems % 4 == 0) {
      for (int h = 0; h < heads; ++h) {
        const int64_t c0 = (t0 * token_elems + static_cast<int64_t>(h) * head_elems) * 4;
        float* c = reinterpret_cast<float*>(const_cast<char*>(TO_ENGINE ? chunk_in + c0 : chunk_out + c0));
        char* eng = engine + base[0] + h * head_stride;
        if (TO_ENGINE && streaming && ((reinterpret_cast<uintptr_t>(eng) | static_cast<uintptr_t>(elem_stride)) & 15) == 0)
          group_f32<TO_ENGINE, true>(eng, c, token_elems, head_elems, elem_stride);
        else
          group_f32<TO_ENGINE, false>(eng, c, token_elems, head_elems, elem_stride);
      }
      continue;
    }
#endif
    for (int h = 0; h < heads; ++h) {
      const int64_t hoff = h * head_stride;
      for (int e = 0; e < head_elems; ++e) {
        const int64_t eoff = hoff + e * elem_stride;
        const int64_t c0 = (t0 * token_elems + static_cast<int64_t>(h) * head_elems + e);
        for (int i = 0; i < g; ++i) {
          T* dst_e = reinterpret_cast<T*>(engine + base[i] + eoff);
          const int64_t ci = c0 + i * token_elems;
          if (TO_ENGINE) {
            T v;
            std::memcpy(&v, chunk_in + ci * static_cast<int64_t>(sizeof(T)), sizeof(T));
            std::memcpy(dst_e, &v, sizeof(T));
          } else {
            T v;
            std::memcpy(&v, dst_e, sizeof(T));
            std::memcpy(chunk_out + ci * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
          }
        }
      }
    }
  }
}

template <bool TO_ENGINE>
void plane(char* engine, const char* chunk_in, char* chunk_out, const int64_t* block_offs, const int64_t* rows,
           int tokens, int heads, int head_elems, int elem_bytes, int64_t row_stride, int64_t elem_stride,
           int64_t head_stride, bool streaming) {
  if (elem_stride == elem_bytes) {   // adjacent elements: a head vector per memcpy
    const size_t n = static_cast<size_t>(head_elems) * elem_bytes;
    for (int t = 0; t < tokens; ++t) {
      char* row = engine + block_offs[t] + rows[t] * row_stride;
      for (int h = 0; h < heads; ++h) {
        const int64_t c = (static_cast<int64_t>(t) * heads + h) * static_cast<int64_t>(n);
        if (TO_ENGINE) put(row + h * head_stride, chunk_in + c, n, streaming);
        else std::memcpy(chunk_out + c, row + h * head_stride, n);
      }
    }
    return;
  }
  switch (elem_bytes) {
    case 1: strided_plane<uint8_t, TO_ENGINE>(engine, chunk_in, chunk_out, block_offs, rows, tokens, heads, head_elems,
                                              row_stride, elem_stride, head_stride, streaming); break;
    case 2: strided_plane<uint16_t, TO_ENGINE>(engine, chunk_in, chunk_out, block_offs, rows, tokens, heads, head_elems,
                                               row_stride, elem_stride, head_stride, streaming); break;
    case 4: strided_plane<uint32_t, TO_ENGINE>(engine, chunk_in, chunk_out, block_offs, rows, tokens, heads, head_elems,
                                               row_stride, elem_stride, head_stride, streaming); break;
    default: strided_plane<uint64_t, TO_ENGINE>(engine, chunk_in, chunk_out, block_offs, rows, tokens, heads,
                                                head_elems, row_stride, elem_stride, head_stride, streaming); break;
  }
}

}  // namespace

KVS_API int kvs_scatter_tiles(const void* chunk, const uint64_t* plane_ptrs, const int64_t* row_strides,
                              const int64_t* elem_strides, int planes, const int64_t* block_offs, const int64_t* rows,
                              int tokens, int heads, int head_elems, int elem_bytes, int64_t head_stride,
                              int streaming, char* err, size_t err_len) {
  int rc = check(plane_ptrs, row_strides, elem_strides, planes, block_offs, rows, tokens, heads, head_elems, elem_bytes,
                 err, err_len);
  if (rc) return rc;
  const auto* in = static_cast<const char*>(chunk);
  const int64_t plane_bytes = static_cast<int64_t>(tokens) * heads * head_elems * elem_bytes;
  for (int p = 0; p < planes; ++p)
    plane<true>(reinterpret_cast<char*>(plane_ptrs[p]), in + p * plane_bytes, nullptr, block_offs, rows, tokens, heads,
                head_elems, elem_bytes, row_strides[p], elem_strides[p], head_stride, streaming != 0);
#if defined(__SSE2__)
  if (streaming) _mm_sfence();  // streamed lines are visible to every core before the caller reads the KV
#endif
  return KVS_OK;
}

KVS_API int kvs_gather_tiles(const uint64_t* plane_ptrs, const int64_t* row_strides, const int64_t* elem_strides,
                             int planes, const int64_t* block_offs, const int64_t* rows, int tokens, int heads,
                             int head_elems, int elem_bytes, int64_t head_stride, void* chunk, char* err,
                             size_t err_len) {
  int rc = check(plane_ptrs, row_strides, elem_strides, planes, block_offs, rows, tokens, heads, head_elems, elem_bytes,
                 err, err_len);
  if (rc) return rc;
  auto* out = static_cast<char*>(chunk);
  const int64_t plane_bytes = static_cast<int64_t>(tokens) * heads * head_elems * elem_bytes;
  for (int p = 0; p < planes; ++p)
    plane<false>(reinterpret_cast<char*>(plane_ptrs[p]), nullptr, out + p * plane_bytes, block_offs, rows, tokens,
                 heads, head_elems, elem_bytes, row_strides[p], elem_strides[p], head_stride, false);
  return KVS_OK;
}
