// Batched GPU decoder of the lossy levels, bit-exact with native/src/codec (CPU) and with the
// first CUDA decoder of codec.cu (kept selectable: kvs_cuda_codec_set_decoder).
//
// Work mapping: one warp per 32 rANS lanes of a segment (layer, K|V) of one chunk (one warp for
// the default 32 lanes, two or four for 64 or 128), one thread per lane, segments of every chunk
// of the batch flattened over the grid so that a batch fills the GPU. Per symbol the decoder's dependency chain is two shared-memory loads
// (the compact model table: bucket -> symbol, then cum|freq) and a multiply-add; lane bytes
// arrive through aligned 4-byte loads issued one word ahead of use, so no global load sits on
// the chain. Output stores: the 32 lanes of a warp write 32 consecutive channels of one token.
//
// kvs_cuda_codec_load_batch: bitstreams in host memory cross PCIe on a copy stream in groups;
// group g decodes while group g+1 is in flight (events order the two streams).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

#include "codec_decode.h"
#include "codec_shared.cuh"
#include "kvstore.h"

namespace {

using kvc::Error;
using kvc::Header;
using kvc::report;
using namespace kvc_cuda;

__device__ CompactModels d_cm;
std::mutex g_models_mu;
bool g_models_done[64] = {false};

// Process-wide decoder choice (kvs_cuda_codec_set_decoder); see codec_decode.h.
std::atomic<int> g_variant{kvc_cuda::kDecoderInitial};
std::atomic<int> g_warps{4};

struct DecArgs {
  const uint8_t* const* bufs;
  const uint64_t* lens;
  void* const* dsts;
  uint64_t payload_off;
  uint32_t L, S, T, C;
  uint32_t segs_total;  // chunks * L * S
  uint32_t chunk_base;  // index of chunk 0 of this launch in the caller's batch (error reports)
  int* err;
  // Mapped launches only (kvc_cuda::DecodeMap): see enqueue_decode_mapped.
  const uint64_t* planes;  // [chunk * L * S + segment]: device address of the segment's plane
  const uint64_t* toks;    // [chunk * T + token]: byte offset of the token in every plane
  uint64_t run_stride;     // bytes between runs of run_elems consecutive channels
  uint32_t run_elems;
  uint32_t layout, heads, head_dim;  // the header every bitstream must carry
  const uint32_t* got;     // CRC32C of each bitstream as it landed (null: no gate)
  const uint32_t* want;    // the CRC32C it was stored with
  // Warps per segment: groups of 32 lanes, enough for the most lanes of any chunk of the launch
  // (each chunk's own count is read from its header on the device).
  uint32_t groups;
};

__device__ __forceinline__ uint32_t ld32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// err[0..2]: the first failure's code, segment and chunk; err[3]: the lowest failing chunk
// (mapped loads start it at 0x7F7F7F7F; others ignore it).
__device__ void fail(int* err, int code, uint32_t seg, uint32_t chunk) {
  if (atomicCAS(err, 0, code) == 0) { err[1] = (int)seg; err[2] = (int)chunk; }
  atomicMin(err + 3, (int)chunk);
}

__device__ __forceinline__ uint64_t ld64(const uint8_t* p) { return (uint64_t)ld32(p) | ((uint64_t)ld32(p + 4) << 32); }

// The 64-byte header of a mapped load's bitstream, checked on the device against the shape the
// caller expects (nothing of the stream is parsed on the host). Every lane of the warp reads the
// same bytes: a warp-uniform answer. The header and index CRCs are not recomputed here: the
// caller proves the whole bitstream by its CRC32C, and every offset read later is bounded anyway.
template <int DT>
__device__ bool header_ok(const uint8_t* b, uint64_t n, const DecArgs& a) {
  if (n < a.payload_off) return false;
  return ld32(b) == ((uint32_t)'K' | ((uint32_t)'V' << 8) | ((uint32_t)'C' << 16) | ((uint32_t)'Z' << 24)) &&
         ld32(b + 4) == ((uint32_t)KVC_VERSION | ((uint32_t)KVC_HEADER_SIZE << 16)) && b[8] == KVC_CODEC_RANS_V1 &&
         b[9] != KVC_LEVEL_LOSSLESS && b[9] < KVC_NUM_LEVELS && b[10] == DT && b[11] == a.layout && ld32(b + 12) == a.L && ld32(b + 16) == a.T &&
         ld32(b + 20) == a.heads && ld32(b + 24) == a.head_dim && ld32(b + 28) == 0 && b[32] == KVC_PROB_BITS &&
         kvc_lanes_valid(b[33]) && b[34] == 0 && b[35] == 0 && ld64(b + 36) == n - a.payload_off;
}

__device__ __forceinline__ uint64_t warp_sum64(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// The byte length of all n lanes of a lane table (every lane of the warp gets it).
__device__ __forceinline__ uint64_t lanes_total(const uint8_t* tbl, uint32_t n, uint32_t j0) {
  uint64_t v = 0;
  for (uint32_t k = j0; k < n; k += 32) v += ld32(tbl + 8 * k);
  return warp_sum64(v);
}

__device__ __forceinline__ uint64_t warp_incl_scan64(uint64_t v, uint32_t lane) {
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t u = __shfl_up_sync(0xFFFFFFFFu, v, o);
    if (lane >= (uint32_t)o) v += u;
  }
  return v;
}

// The bytes of one lane, read through aligned 4-byte loads one word ahead of use. Words are
// read only up to the end of the chunk's buffer (wend: an aligned word holding a byte of the
// buffer is inside its allocation); `rem` bounds the lane itself: a lane read past its end
// sets `over` (checked once per lane, after the loop: the bytes read meanwhile are other
// lanes' or zero, never outside the buffer).
struct LaneReader {
  const uint32_t* wp;
  const uint32_t* wend;
  uint64_t bits;  // the next nb bytes, next byte lowest
  uint32_t nb;
  uint32_t pend;  // the word after those
  uint32_t rem;   // bytes of the lane not yet consumed
  bool over;

  __device__ __forceinline__ uint32_t next_word() { return wp < wend ? __ldg(wp++) : 0u; }
  __device__ __forceinline__ void init(const uint8_t* lp, uint32_t len, const uint8_t* buf_end) {
    rem = len;
    over = false;
    const uintptr_t a = (uintptr_t)lp;
    wp = reinterpret_cast<const uint32_t*>(a & ~(uintptr_t)3);
    wend = reinterpret_cast<const uint32_t*>(((uintptr_t)buf_end + 3) & ~(uintptr_t)3);
    const uint32_t sh = (uint32_t)(a & 3);
    bits = (uint64_t)(next_word() >> (8 * sh));
    nb = 4 - sh;
    bits |= (uint64_t)next_word() << (8 * nb);
    nb += 4;
    pend = next_word();
  }
  // Renormalises x (>= 2^11 after a decode step: freq >= 1, x was >= L) with the 0, 1 or 2
  // bytes that bring it to >= L, without a branch; the next byte is the most significant.
  __device__ __forceinline__ uint32_t renorm(uint32_t x) {
    const uint32_t n = (x < (KVC_RANS_L >> 8)) + (x < KVC_RANS_L);
    const uint32_t two = __byte_perm((uint32_t)bits, 0u, 0x4401u);  // b0 << 8 | b1
    over |= n > rem;
    rem -= n;
    x = (x << (8 * n)) | (two >> (16 - 8 * n));
    bits >>= 8 * n;
    nb -= n;
    if (nb <= 4) {  // nb >= 3 here: the buffer never runs dry within a step
      bits |= (uint64_t)pend << (8 * nb);
      nb += 4;
      pend = next_word();
    }
    return x;
  }
};

template <int DT>
using Elem = typename std::conditional<DT == KVC_DTYPE_F32, float, uint16_t>::type;

template <int DT, bool HWCVT>
__device__ __forceinline__ void put(Elem<DT>* dst, uint64_t o, float f) {
  if (DT == KVC_DTYPE_F16) {
    dst[o] = HWCVT ? __half_as_ushort(__float2half_rn(f)) : kvc_float_to_half(f);
  } else if (DT == KVC_DTYPE_BF16) {
    dst[o] = HWCVT ? __bfloat16_as_ushort(__float2bfloat16_rn(f)) : kvc_float_to_bf16(f);
  } else {
    dst[o] = f;
  }
}

// Both model entries of a decode step from shared memory, issued back to back: the compiler
// otherwise loads the second one only after comparing the first (a predicated load), which
// puts two dependent shared loads after the bucket's on the symbol chain instead of one.
__device__ __forceinline__ void ld_pair_shared(const uint32_t* p, uint32_t& e0, uint32_t& e1) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(e0) : "r"(a));
  asm volatile("ld.shared.u32 %0, [%1+4];" : "=r"(e1) : "r"(a));
}

// blockDim.x = 32 * warps; warp w of block b decodes flattened segment b * warps + w.
// MAPPED: the output goes where DecArgs' plane / token map says (engine memory), the header is
// checked on the device, and with a gate a chunk decodes only when its bitstream and every
// earlier one landed with the CRC32C they were stored with.
// SHORT (variant warp-smem-hw-short): the same arithmetic with a shorter symbol chain: both
// model entries loaded at once (ld_pair_shared), and a mapped load's token offset read one
// token ahead so that the output store never waits for it.
template <int DT, bool SMEM, bool HWCVT, bool MAPPED, bool SHORT = false>
__global__ void __launch_bounds__(256) k_decode_warp(const DecArgs a) {
  using ElemT = Elem<DT>;
  __shared__ CompactModels sm[SMEM ? 1 : 1];
  const CompactModels* M = &d_cm;
  if (SMEM) {
    const uint4* src = reinterpret_cast<const uint4*>(&d_cm);
    uint4* dstw = reinterpret_cast<uint4*>(&sm[0]);
    for (uint32_t i = threadIdx.x; i < sizeof(CompactModels) / 16; i += blockDim.x) dstw[i] = src[i];
    __syncthreads();
    M = &sm[0];
  }
  const uint32_t warps = blockDim.x >> 5, j0 = threadIdx.x & 31u;
  const uint64_t w = (uint64_t)blockIdx.x * warps + (threadIdx.x >> 5);
  if (w >= (uint64_t)a.segs_total * a.groups) return;
  // warp w decodes lanes [32 q, 32 q + 32) of flattened segment g
  const uint32_t g = (uint32_t)(w / a.groups), q = (uint32_t)(w % a.groups);
  const uint32_t per_chunk = a.L * a.S;
  const uint32_t chunk = g / per_chunk, seg = g % per_chunk, l = seg / a.S, s = seg % a.S;
  const uint32_t T = a.T, C = a.C;
  const uint32_t ec = a.chunk_base + chunk;
  if (MAPPED && a.want != nullptr) {  // the proven prefix only: chunks 0..ec all landed intact
    bool ok = true;
    for (uint32_t k = j0; k <= ec; k += 32) ok &= a.got[k] == a.want[k];
    if (!__all_sync(0xFFFFFFFFu, ok)) return;
  }
  const uint8_t* __restrict__ buf = a.bufs[chunk];
  const uint64_t n_buf = a.lens[chunk];
  void* __restrict__ dst = MAPPED ? nullptr : a.dsts[chunk];
  const uint64_t po = a.payload_off;
  if (MAPPED && !header_ok<DT>(buf, n_buf, a)) { fail(a.err, kErrHeader, seg, ec); return; }
  if (!MAPPED && n_buf < KVC_HEADER_SIZE) { fail(a.err, kErrLayout, seg, ec); return; }
  // This chunk's lanes (the header's count; the host checked it, or header_ok did), the lane
  // groups they need and this thread's lane j. A warp past the chunk's groups has nothing to do.
  const uint32_t lanes_hdr = buf[33];
  if (!kvc_lanes_valid(lanes_hdr)) { fail(a.err, kErrHeader, seg, ec); return; }
  const uint32_t n = C < lanes_hdr ? C : lanes_hdr, ng = (n + 31) / 32;
  if (ng > a.groups) {  // more lanes than this launch has warps for
    if (q == 0) fail(a.err, kErrHeader, seg, ec);
    return;
  }
  if (q >= ng) return;
  const uint32_t j = 32 * q + j0;
  // Mapped output: channel c of token t of this segment at plane + toks[t] + chan(c).
  uint8_t* const plane = MAPPED ? reinterpret_cast<uint8_t*>((uintptr_t)a.planes[(uint64_t)chunk * per_chunk + seg]) : nullptr;
  const uint64_t* const toks = MAPPED ? a.toks + (uint64_t)chunk * a.T : nullptr;
  const uint8_t* ie = buf + KVC_HEADER_SIZE + 16ull * l;
  const uint64_t loff = (uint64_t)ld32(ie) | ((uint64_t)ld32(ie + 4) << 32);
  const uint32_t lsize = ld32(ie + 8);
  // Everything up to the lane split is the same in every lane of the warp (warp-uniform exits).
  if (po > n_buf || loff > n_buf - po || lsize > n_buf - po - loff) { fail(a.err, kErrLayout, seg, ec); return; }
  const uint8_t* p = buf + po + loff;
  const uint8_t* const end = p + lsize;
  const uint8_t* const buf_end = buf + n_buf;
  const uint32_t B = kvc_dtype_size(DT);
  const uint64_t head = (uint64_t)C * KVC_CHANNEL_META_SIZE + (uint64_t)n * KVC_LANE_ENTRY_SIZE;
  uint32_t R = 0;
  const uint8_t* ridx = p;
  for (uint32_t ss = 0; ss <= s; ss++) {  // walk to segment s
    if (end - p < 2) { fail(a.err, kErrLayout, seg, ec); return; }
    R = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint64_t raw = 2 + 4ull * R + (uint64_t)R * C * B;
    if (R > KVC_MAX_RAW_TOKENS || R > T || (uint64_t)(end - p) < raw + head) { fail(a.err, kErrLayout, seg, ec); return; }
    ridx = p + 2;
    p += raw;
    if (ss == s) break;
    const uint8_t* tbl = p + (uint64_t)C * KVC_CHANNEL_META_SIZE;
    const uint64_t total = lanes_total(tbl, n, j0);
    if (total > (uint64_t)(end - p) - head) { fail(a.err, kErrLayout, seg, ec); return; }
    p += head + total;
  }
  const uint64_t base = (uint64_t)seg * T * C;
  {  // raw rows of this lane's channels
    uint32_t next = 0;
    const uint8_t* rows = ridx + 4ull * R;
    for (uint32_t r = 0; r < R; r++) {
      const uint32_t t = ld32(ridx + 4 * r);
      if (t >= T || t < next) { fail(a.err, kErrMeta, seg, ec); return; }
      next = t + 1;
      for (uint32_t c = j; c < C; c += n) {
        uint8_t* o = MAPPED ? plane + toks[t] + (uint64_t)(c / a.run_elems) * a.run_stride + (uint64_t)(c % a.run_elems) * B
                            : (uint8_t*)dst + (base + (uint64_t)t * C + c) * B;
        for (uint32_t b = 0; b < B; b++) o[b] = rows[((uint64_t)r * C + c) * B + b];
      }
    }
  }
  const uint8_t* meta = p;
  const uint8_t* tbl = p + (uint64_t)C * KVC_CHANNEL_META_SIZE;
  const uint8_t* data = p + head;
  const uint32_t mylen = j < n ? ld32(tbl + 8 * j) : 0u;
  uint64_t before = 0;  // the lanes of the groups before this warp's
  for (uint32_t k = j0; k < 32 * q; k += 32) before += ld32(tbl + 8 * k);
  const uint64_t incl = warp_sum64(before) + warp_incl_scan64(mylen, j0);
  const uint64_t total = lanes_total(tbl, n, j0);
  if (total > (uint64_t)(end - data)) { fail(a.err, kErrLayout, seg, ec); return; }
  if (s == a.S - 1 && data + total != end) { fail(a.err, kErrEnd, seg, ec); return; }
  if (j >= n) return;
  uint32_t x = ld32(tbl + 8 * j + 4);
  if (x < KVC_RANS_L || x >= (KVC_RANS_L << 8)) { fail(a.err, kErrLayout, seg, ec); return; }
  LaneReader rd;
  rd.init(data + (incl - mylen), mylen, buf_end);
  const uint32_t first_raw = R ? ld32(ridx) : T;
  const uint32_t nch = (C - j + n - 1) / n;
  for (uint32_t ci = 0; ci < nch; ci++) {
    const uint32_t c = j + ci * n;
    const uint32_t mw = ld32(meta + (uint64_t)c * KVC_CHANNEL_META_SIZE);
    const uint32_t mb = (mw >> 8) & 0xFFu;
    const int32_t ctr = (int16_t)(uint16_t)(mw >> 16);
    if ((mb & KVC_MODEL_RESERVED_MASK) || ctr > KVC_QMAX || ctr < -KVC_QMAX) { fail(a.err, kErrMeta, seg, ec); return; }
    const float step_f = kvc_step(mw & 0xFFu);
    const uint32_t k = mb & KVC_MODEL_INDEX_MASK, lim = M->lim[k], moff = M->moff[k];
    const uint8_t* bk = M->bucket[k];
    const uint32_t* ent = M->ent + moff;
    const bool delta = mb & KVC_MODEL_DELTA_BIT;
    int32_t pred = ctr;
    uint32_t ri = 0, next_raw = first_raw, bad = 0;
    ElemT* out = MAPPED ? nullptr : static_cast<ElemT*>(dst) + base + c;
    uint8_t* const cplane =
        MAPPED ? plane + (uint64_t)(c / a.run_elems) * a.run_stride + (uint64_t)(c % a.run_elems) * B : nullptr;
    uint64_t tok_next = MAPPED && SHORT ? toks[0] : 0;
    for (uint32_t t = 0; t < T; t++, out += MAPPED ? 0 : C) {
      uint64_t tok = 0;
      if (MAPPED && SHORT) {  // this token's offset was loaded one token ago
        tok = tok_next;
        tok_next = toks[t + 1 < T ? t + 1 : t];
      }
      if (t == next_raw) {  // the same tokens in every lane: no divergence
        ri++;
        next_raw = ri < R ? ld32(ridx + 4 * ri) : T;
        continue;
      }
      const uint32_t slot = x & (KVC_PROB_TOTAL - 1);
      uint32_t z = bk[slot >> kBucketShift];
      // the bucket's symbol or the next one, both loaded at once (no branch); further steps
      // (buckets holding three or more thin tail symbols) are rare
      uint32_t e0, e1;
      if (SHORT && SMEM) {
        ld_pair_shared(ent + z, e0, e1);
      } else {
        e0 = ent[z];
        e1 = ent[z + 1];
      }
      const bool step = slot >= (e0 & 0xFFFFu) + (e0 >> 16);
      // SHORT: an arithmetic select, so that e1 is needed whatever `step` is and its load is
      // not turned into one predicated on the comparison
      uint32_t e = SHORT ? e0 ^ ((e0 ^ e1) & (0u - (uint32_t)step)) : (step ? e1 : e0);
      z += step;
      while (slot >= (e & 0xFFFFu) + (e >> 16)) e = ent[++z];
      x = rd.renorm((e >> 16) * (x >> KVC_PROB_BITS) + slot - (e & 0xFFFFu));
      if (z == lim) {  // escape: two uniform bypass bytes (freq 16: at most one renormalisation byte each)
        uint32_t zz = 0;
#pragma unroll
        for (int i = 0; i < 2; i++) {
          const uint32_t sl = x & (KVC_PROB_TOTAL - 1);
          zz |= (sl / KVC_BYPASS_FREQ) << (8 * i);
          x = rd.renorm(KVC_BYPASS_FREQ * (x >> KVC_PROB_BITS) + (sl & (KVC_BYPASS_FREQ - 1)));
        }
        z = zz;
      }
      const int32_t v = pred + kvc_unzigzag(z);
      bad |= (uint32_t)(v + KVC_QMAX) > 2u * KVC_QMAX;
      if (delta) pred = v;
      if (MAPPED) out = reinterpret_cast<ElemT*>(cplane + (SHORT ? tok : toks[t]));
      put<DT, HWCVT>(out, 0, kvc_dequantize(v, step_f));
    }
    if (bad) { fail(a.err, kErrValue, seg, ec); return; }
  }
  if (rd.over) { fail(a.err, kErrStream, seg, ec); return; }
  if (!(x == KVC_RANS_L && rd.rem == 0)) fail(a.err, kErrEnd, seg, ec);
}

template <bool SMEM, bool HWCVT, bool MAPPED, bool SHORT = false>
void launch_t(int dtype, uint32_t blocks, uint32_t threads, cudaStream_t st, const DecArgs& a) {
  if (dtype == KVC_DTYPE_F16) k_decode_warp<KVC_DTYPE_F16, SMEM, HWCVT, MAPPED, SHORT><<<blocks, threads, 0, st>>>(a);
  else if (dtype == KVC_DTYPE_BF16) k_decode_warp<KVC_DTYPE_BF16, SMEM, HWCVT, MAPPED, SHORT><<<blocks, threads, 0, st>>>(a);
  else k_decode_warp<KVC_DTYPE_F32, SMEM, HWCVT, MAPPED, SHORT><<<blocks, threads, 0, st>>>(a);
}

uint32_t launch_blocks(const DecArgs& a, uint32_t warps) {
  return (uint32_t)(((uint64_t)a.segs_total * a.groups + warps - 1) / warps);
}

void launch(int variant, int dtype, const DecArgs& a, cudaStream_t st) {
  const uint32_t warps = (uint32_t)g_warps.load();
  const uint32_t blocks = launch_blocks(a, warps);
  switch (variant) {
    case kDecoderWarpSmemHw: launch_t<true, true, false>(dtype, blocks, 32 * warps, st, a); break;
    case kDecoderWarpGlobal: launch_t<false, false, false>(dtype, blocks, 32 * warps, st, a); break;
    case kDecoderWarpGlobalHw: launch_t<false, true, false>(dtype, blocks, 32 * warps, st, a); break;
    case kDecoderWarpSmemHwShort: launch_t<true, true, false, true>(dtype, blocks, 32 * warps, st, a); break;
    default: launch_t<true, false, false>(dtype, blocks, 32 * warps, st, a); break;
  }
}

// Mapped launches: the models in shared memory, with the variant's conversion (the global-model
// variants map to the shared-model kernel of the same conversion).
void launch_mapped(int variant, int dtype, const DecArgs& a, cudaStream_t st) {
  const uint32_t warps = (uint32_t)g_warps.load();
  const uint32_t blocks = launch_blocks(a, warps);
  if (variant == kDecoderWarpSmemHwShort) launch_t<true, true, true, true>(dtype, blocks, 32 * warps, st, a);
  else if (variant == kDecoderWarpSmemHw || variant == kDecoderWarpGlobalHw) launch_t<true, true, true>(dtype, blocks, 32 * warps, st, a);
  else launch_t<true, false, true>(dtype, blocks, 32 * warps, st, a);
}

// Self-test of the hardware conversions against the format's portable ones over every finite
// binary32 value: counts of differing results (f16, bf16) in out[0..1].
__global__ void k_cvt_check(uint64_t start, unsigned long long* out) {
  const uint64_t i = start + (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i > 0xFFFFFFFFull) return;
  const float f = kvc_u2f((uint32_t)i);
  if (kvc_is_nan(f)) return;
  if (__half_as_ushort(__float2half_rn(f)) != kvc_float_to_half(f)) atomicAdd(out, 1ull);
  if (__bfloat16_as_ushort(__float2bfloat16_rn(f)) != kvc_float_to_bf16(f)) atomicAdd(out + 1, 1ull);
}

}  // namespace

namespace kvc_cuda {

int decode_variant() { return g_variant.load(); }

uint32_t lane_groups(uint32_t lanes, uint32_t C) {
  const uint32_t n = C < lanes ? C : lanes;
  return n == 0 ? 1 : (n + 31) / 32;
}

bool ensure_decode_models(Error& e) { return upload_models(d_cm, g_models_done, g_models_mu, e); }

bool mapped_resident_warps(uint64_t* warps_out, Error& e) {
  // per device and block size (kvs_cuda_codec_set_decoder changes the latter): computed once
  static std::mutex mu;
  static uint64_t cache[64][9] = {{0}};
  int dev = 0, sms = 0, blocks = 0;
  const int warps = g_warps.load();
  if (!cuda_ok(cudaGetDevice(&dev), e, "cudaGetDevice")) return false;
  if (dev < 0 || dev >= 64 || warps < 1 || warps > 8) return e.fail("device %d / %d warps out of range", dev, warps);
  std::lock_guard<std::mutex> lock(mu);
  uint64_t& c = cache[dev][warps];
  if (c == 0) {
    if (!cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e, "device attribute") ||
        !cuda_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                     &blocks, k_decode_warp<KVC_DTYPE_F16, true, true, true, true>, 32 * warps, 0), e, "occupancy"))
      return false;
    c = (uint64_t)(sms > 0 ? sms : 1) * (uint64_t)(blocks > 0 ? blocks : 1) * (uint64_t)warps;
  }
  *warps_out = c;
  return true;
}

bool enqueue_decode(int variant, const Header& h, uint32_t count, uint32_t chunk_base, const uint8_t* const* d_bufs,
                    const uint64_t* d_lens, void* const* d_dsts, int* derr, cudaStream_t st, Error& e) {
  DecArgs a{d_bufs, d_lens, d_dsts, h.payload_offset(), h.layers, h.segments(), h.tokens, (uint32_t)h.channels(),
            count * h.layers * h.segments(), chunk_base, derr};
  a.groups = lane_groups(h.lanes, (uint32_t)h.channels());
  launch(variant, h.dtype, a, st);
  return cuda_ok(cudaGetLastError(), e, "decode launch");
}

bool enqueue_decode_mapped(int variant, const Header& h, uint32_t count, uint32_t chunk_base,
                           const uint8_t* const* d_bufs, const uint64_t* d_lens, const DecodeMap& m, int* derr,
                           cudaStream_t st, Error& e) {
  const uint32_t P = h.layers * h.segments();
  DecArgs a{d_bufs, d_lens, nullptr, h.payload_offset(), h.layers, h.segments(), h.tokens, (uint32_t)h.channels(),
            count * P, chunk_base, derr,
            m.planes + (uint64_t)chunk_base * P, m.toks + (uint64_t)chunk_base * h.tokens, m.run_stride, m.run_elems,
            h.layout, h.heads, h.head_dim, m.got, m.want};
  a.groups = lane_groups(h.lanes, (uint32_t)h.channels());
  launch_mapped(variant, h.dtype, a, st);
  return cuda_ok(cudaGetLastError(), e, "mapped decode launch");
}

}  // namespace kvc_cuda

KVS_API int kvs_cuda_codec_set_decoder(int variant, int warps_per_block, char* err, size_t err_len) {
  Error e;
  if (variant < kvc_cuda::kDecoderFirst || variant > kvc_cuda::kDecoderLast || warps_per_block < 1 ||
      warps_per_block > 8) {
    e.fail("decoder variant %d (0..%d) or warps per block %d (1..8) out of range", variant,
           kvc_cuda::kDecoderLast, warps_per_block);
    return report(KVS_EINVAL, e, err, err_len);
  }
  g_variant.store(variant);
  g_warps.store(warps_per_block);
  return KVS_OK;
}

KVS_API int kvs_cuda_codec_selftest(uint64_t* mismatches_f16, uint64_t* mismatches_bf16, char* err, size_t err_len) {
  Error e;
  unsigned long long* d = nullptr;
  unsigned long long h[2] = {0, 0};
  const uint64_t per_launch = 1ull << 30;
  bool ok = cuda_ok(cudaMalloc(&d, 16), e, "cudaMalloc") && cuda_ok(cudaMemset(d, 0, 16), e, "memset");
  for (uint64_t s = 0; ok && s < (1ull << 32); s += per_launch) {
    k_cvt_check<<<(unsigned)(per_launch / 256), 256>>>(s, d);
    ok = cuda_ok(cudaGetLastError(), e, "selftest launch");
  }
  ok = ok && cuda_ok(cudaMemcpy(h, d, 16, cudaMemcpyDeviceToHost), e, "selftest copy");
  if (d) cudaFree(d);
  if (!ok) return report(KVS_EINTERNAL, e, err, err_len);
  *mismatches_f16 = h[0];
  *mismatches_bf16 = h[1];
  return KVS_OK;
}
