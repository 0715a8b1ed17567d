// Shared definitions of the KV codec: format constants and the exact, deterministic
// scalar math (dtype conversion, quantiser, model choice) used by both the C++ and the
// CUDA implementation. Everything here is integer or single IEEE-754 operations, so the
// CPU and GPU produce identical bits. See docs/bitstream.md.
#pragma once
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define KVC_HD __host__ __device__ __forceinline__
#else
#define KVC_HD static inline
#endif

// ---- container constants ---------------------------------------------------------------
#define KVC_MAGIC "KVCZ"
#define KVC_VERSION 1
#define KVC_HEADER_SIZE 64
#define KVC_INDEX_ENTRY_SIZE 16
#define KVC_CODEC_RANS_V1 1

#define KVC_DTYPE_F16 1
#define KVC_DTYPE_BF16 2
#define KVC_DTYPE_F32 3

#define KVC_LAYOUT_KV 1   // [layers, 2, tokens, heads, head_dim]
#define KVC_LAYOUT_MLA 2  // [layers, tokens, latent]

#define KVC_LEVEL_LOSSLESS 0
#define KVC_LEVEL_NEAR_LOSSLESS 1
#define KVC_LEVEL_DEFAULT 2
#define KVC_LEVEL_AGGRESSIVE 3
#define KVC_NUM_LEVELS 4

// ---- limits the decoder enforces (hostile input) ----------------------------------------
#define KVC_MAX_LAYERS 4096u
#define KVC_MAX_TOKENS (1u << 20)
#define KVC_MAX_CHANNELS (1u << 20)          // heads * head_dim (or latent) per segment
#define KVC_MAX_ELEMENTS (1ull << 31)        // whole chunk (4 GiB of fp16)

// ---- rANS ------------------------------------------------------------------------------
#define KVC_PROB_BITS 12
#define KVC_PROB_TOTAL (1u << KVC_PROB_BITS)
#define KVC_RANS_L (1u << 23)                // lower bound of the normalised state
#define KVC_MAX_LANES 128u                   // lanes per lossy segment: 32 (the default), 64 or 128
#define KVC_LANES_DEFAULT 32u
#define KVC_LOSSLESS_LANES 32u               // lossless planes always use 32 lanes
#define KVC_LANE_ENTRY_SIZE 8                // u32 byte length + u32 final state
// A lossy segment's lane count: the header's `lanes` field (docs/bitstream.md); more lanes
// are more parallel decode (GPU) for a larger lane table (8 bytes per lane per segment).
KVC_HD int kvc_lanes_valid(unsigned lanes) { return lanes == 32u || lanes == 64u || lanes == 128u; }
#define KVC_BYPASS_FREQ (KVC_PROB_TOTAL / 256u)  // uniform byte after an escape

// ---- lossy quantiser -------------------------------------------------------------------
#define KVC_QMAX 16383                       // |q| bound; residuals fit 16-bit zigzag
#define KVC_NUM_MODELS 64                    // static symbol models (tables.h)
#define KVC_CHANNEL_META_SIZE 4              // step code u8, model u8, centre i16
#define KVC_MODEL_DELTA_BIT 0x80u            // predictor: previous token (else centre)
#define KVC_MODEL_INDEX_MASK 0x3Fu
#define KVC_MODEL_RESERVED_MASK 0x40u
#define KVC_QL_FLOOR (-4 * 40)               // quarter-log2 of zero / tiny values
#define KVC_MAX_RAW_TOKENS 16                // verbatim token rows per lossy segment
#define KVC_RAW_TOKEN_DEVIATION 8            // quarter-octaves: a token whose mean magnitude is
                                             // 2 octaves off the segment's is kept verbatim
                                             // (attention sinks: their error is magnified)


KVC_HD uint32_t kvc_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KVC_HD float kvc_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// IEEE half -> float, exact.
KVC_HD float kvc_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) bits = sign;
    else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; e++; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
  else bits = sign | ((exp + 112u) << 23) | (man << 13);
  return kvc_u2f(bits);
}

// float -> IEEE half, round to nearest even; overflow -> inf, NaN kept quiet.
KVC_HD uint16_t kvc_float_to_half(float f) {
  uint32_t x = kvc_f2u(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return (uint16_t)(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520 -> inf
  if (ax < 0x38800000u) {  // result subnormal or zero
    if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to 0
    uint32_t e = ax >> 23;
    uint32_t man = (ax & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14..24 (value = man * 2^(e-150); half sub unit 2^-24)
    uint32_t hm = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (hm & 1u))) hm++;
    return (uint16_t)(sign | hm);
  }
  uint32_t hbits = ((ax >> 13) - (112u << 10));
  uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (hbits & 1u))) hbits++;
  return (uint16_t)(sign | hbits);
}

KVC_HD float kvc_bf16_to_float(uint16_t b) { return kvc_u2f((uint32_t)b << 16); }

KVC_HD uint16_t kvc_float_to_bf16(float f) {
  uint32_t x = kvc_f2u(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7FFFu + lsb;
  return (uint16_t)(x >> 16);
}

KVC_HD uint32_t kvc_dtype_size(int dtype) {
  return dtype == KVC_DTYPE_F32 ? 4u : (dtype == KVC_DTYPE_F16 || dtype == KVC_DTYPE_BF16) ? 2u : 0u;
}

// Element i of a buffer of `dtype` as float (exact).
KVC_HD float kvc_load(const void* p, uint64_t i, int dtype) {
  if (dtype == KVC_DTYPE_F16) return kvc_half_to_float(((const uint16_t*)p)[i]);
  if (dtype == KVC_DTYPE_BF16) return kvc_bf16_to_float(((const uint16_t*)p)[i]);
  return ((const float*)p)[i];
}

KVC_HD void kvc_store(void* p, uint64_t i, int dtype, float v) {
  if (dtype == KVC_DTYPE_F16) ((uint16_t*)p)[i] = kvc_float_to_half(v);
  else if (dtype == KVC_DTYPE_BF16) ((uint16_t*)p)[i] = kvc_float_to_bf16(v);
  else ((float*)p)[i] = v;
}

KVC_HD bool kvc_is_nan(float v) { return (kvc_f2u(v) & 0x7FFFFFFFu) > 0x7F800000u; }

// Lossy input sanitising: NaN -> 0, +-inf -> +-float max (then clamped by the quantiser).
KVC_HD float kvc_sanitize(float v) {
  uint32_t a = kvc_f2u(v) & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0.0f;
  if (a == 0x7F800000u) return v > 0 ? 3.4028235e38f : -3.4028235e38f;
  return v;
}

// Quarter-log2 magnitude of |v|: 4*floor(log2|v|) + top two mantissa bits. Integer stat.
KVC_HD int32_t kvc_qlog(float v) {
  uint32_t a = kvc_f2u(v) & 0x7FFFFFFFu;
  int32_t e = (int32_t)(a >> 23) - 127;
  if (a < 0x00800000u || e < -40) return KVC_QL_FLOOR;
  if (e > 127) e = 127;
  return 4 * e + (int32_t)((a >> 21) & 3u);
}

// Step of step code s: 2^((s - 128) / 4), built from bits (exact everywhere).
KVC_HD float kvc_step(uint32_t s) {
  const uint32_t mant[4] = {0x3F800000u, 0x3F9837F0u, 0x3FB504F3u, 0x3FD744FDu};  // 2^(j/4)
  int32_t e = (int32_t)(s >> 2) - 32;  // -32 .. 31
  return kvc_u2f(mant[s & 3u] + (uint32_t)(e * (1 << 23)));
}

// Round-to-nearest-even quantisation of v by step, clamped to +-KVC_QMAX.
KVC_HD int32_t kvc_quantize(float v, float step) {
#ifdef __CUDA_ARCH__
  float r = __fdiv_rn(v, step);
  if (r > (float)KVC_QMAX) return KVC_QMAX;
  if (r < -(float)KVC_QMAX) return -KVC_QMAX;
  return __float2int_rn(r);
#else
  float r = v / step;
  if (r > (float)KVC_QMAX) return KVC_QMAX;
  if (r < -(float)KVC_QMAX) return -KVC_QMAX;
  return (int32_t)__builtin_rintf(r);
#endif
}

KVC_HD float kvc_dequantize(int32_t q, float step) {
#ifdef __CUDA_ARCH__
  return __fmul_rn((float)q, step);
#else
  return (float)q * step;
#endif
}

KVC_HD uint32_t kvc_zigzag(int32_t r) { return r >= 0 ? (uint32_t)r * 2u : (uint32_t)(-r) * 2u - 1u; }
KVC_HD int32_t kvc_unzigzag(uint32_t z) { return (z & 1u) ? -(int32_t)((z + 1u) >> 1) : (int32_t)(z >> 1); }

// floor(a / b) for b > 0
KVC_HD int64_t kvc_floordiv(int64_t a, int64_t b) { int64_t q = a / b; return (q * b > a) ? q - 1 : q; }

// ---- encoder policy of the lossy levels ------------------------------------------------
// Step code of a channel: base + w/2 * (Lc - Lbar), bounded below so |x/step| <= KVC_QMAX/2.
// Offsets are in quarter-octaves relative to the mean quarter-log2 magnitude of the segment.
typedef struct {
  int8_t off[2][3];    // [K/V][layer group] step offset (quarter-octaves)
  uint8_t w[2];        // [K/V] channel adaptivity in halves: 0 uniform step, 2 per-channel SNR
} kvc_level_params;

// Layer groups: [0, L/6) shallow, [L/6, L/2) middle, [L/2, L) deep.
KVC_HD int kvc_layer_group(uint32_t layer, uint32_t layers) {
  if (6u * layer < layers) return 0;
  if (2u * layer < layers) return 1;
  return 2;
}


// Step code of one channel (see docs/bitstream.md, "Encoder policy"): Lc is the channel's
// floor-mean quarter-log2 magnitude, lbar the segment's floor-mean of Lc, qlmax the
// channel's largest quarter-log2 magnitude.
// A constant channel (every value equal) gets the finest step, so it is reproduced closely
// at no rate cost (its residuals are all zero).
KVC_HD uint32_t kvc_step_code(int64_t lc, int64_t lbar, int32_t qlmax, int32_t off, int32_t w, bool constant) {
  int64_t code = lbar + off + kvc_floordiv((int64_t)w * (lc - lbar), 2) + 128;
  int64_t lo = (int64_t)qlmax + 4 + 128 - 52;  // keeps |x / step| < 2^13 <= KVC_QMAX
  if (code < lo || constant) code = lo;
  if (code < 0) code = 0;
  if (code > 255) code = 255;
  return (uint32_t)code;
}

// Maximum-likelihood model index for a residual column with sum |r| over `tokens`.
KVC_HD uint32_t kvc_choose_model(uint64_t sum_abs, uint32_t tokens, const uint32_t* thr_q16, uint32_t n) {
  uint32_t k = 0;
  const uint64_t s = sum_abs << 16;
  for (uint32_t i = 1; i < n; i++)
    if (s >= (uint64_t)thr_q16[i] * tokens) k = i;
  return k;
}

// Centre of a quantised column: round-half-up of the mean, floor semantics for negatives.
KVC_HD int32_t kvc_center(int64_t sum_q, uint32_t tokens) {
  return (int32_t)kvc_floordiv(2 * sum_q + tokens, 2 * (int64_t)tokens);
}
