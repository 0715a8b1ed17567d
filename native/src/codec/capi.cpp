// kvs_codec_* of kvstore.h: argument checking, layer orchestration (threads) and the container.
#include "kvstore.h"

#include <string.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "format.h"
#include "levels.h"
#include "segment.h"

using namespace kvc;

namespace {

// Runs f(i) for i in [0, n) on up to `threads` threads.
template <class F>
void parallel_for(uint32_t n, int threads, F f) {
  const uint32_t t = (uint32_t)std::max(1, std::min<int>(threads, (int)n));
  if (t <= 1) { for (uint32_t i = 0; i < n; i++) f(i); return; }
  std::atomic<uint32_t> next{0};
  std::vector<std::thread> pool;
  for (uint32_t w = 0; w < t; w++)
    pool.emplace_back([&] { for (uint32_t i; (i = next++) < n;) f(i); });
  for (auto& th : pool) th.join();
}

bool make_header(int dtype, int layout, uint32_t L, uint32_t T, uint32_t H, uint32_t D, int level, int lanes,
                 Header& h, Error& e) {
  if (level < 0 || level >= KVC_NUM_LEVELS) return e.fail("unknown level %d", level);
  if (!set_lanes(h, level, lanes, e)) return false;
  if (dtype < 1 || dtype > 3) return e.fail("unknown dtype %d", dtype);
  if (layout < 1 || layout > 2) return e.fail("unknown layout %d", layout);
  h.level = (uint8_t)level; h.dtype = (uint8_t)dtype; h.layout = (uint8_t)layout;
  h.layers = L; h.tokens = T; h.heads = H; h.head_dim = D;
  return check_shape(h, e);
}

}  // namespace

KVS_API uint64_t kvs_codec_encode_bound(int dtype, int layout, uint32_t L, uint32_t T, uint32_t H, uint32_t D, int level) {
  (void)level;
  const uint64_t S = layout == KVC_LAYOUT_KV ? 2 : 1, C = (uint64_t)H * D, B = kvc_dtype_size(dtype);
  const uint64_t per_seg = (uint64_t)T * C * std::max<uint64_t>(4, B + 1) + C * KVC_CHANNEL_META_SIZE +
                           (B + 1) * (KVC_MAX_LANES * (KVC_LANE_ENTRY_SIZE + 8) + 3 * 256 + 3);
  return KVC_HEADER_SIZE + (uint64_t)KVC_INDEX_ENTRY_SIZE * L + L * S * per_seg;
}

KVS_API int kvs_codec_encode(const void* src, uint64_t src_bytes, int dtype, int layout, uint32_t L, uint32_t T,
                      uint32_t H, uint32_t D, int level, int lanes, const int32_t* policy, int threads, uint8_t* dst,
                      uint64_t dst_cap, uint64_t* out_size, char* err, size_t err_len) {
  Error e;
  Header h;
  if (!make_header(dtype, layout, L, T, H, D, level, lanes, h, e)) return report(KVS_EINVAL, e, err, err_len);
  const uint64_t B = kvc_dtype_size(dtype);
  if (src == nullptr || src_bytes != h.elements() * B) {
    e.fail("source has %llu bytes, shape needs %llu", (unsigned long long)src_bytes,
           (unsigned long long)(h.elements() * B));
    return report(KVS_EINVAL, e, err, err_len);
  }
  std::vector<std::vector<uint8_t>> layers(L);
  const uint64_t seg_elems = (uint64_t)T * h.channels();
  kvc_level_params lp = kvc_level_defaults(level);
  if (policy != nullptr) {
    for (int i = 0; i < 6; i++) {
      if (policy[i] < -64 || policy[i] > 64) { e.fail("policy offset out of range"); return report(KVS_EINVAL, e, err, err_len); }
      lp.off[i / 3][i % 3] = (int8_t)policy[i];
    }
    for (int i = 0; i < 2; i++) {
      if (policy[6 + i] < 0 || policy[6 + i] > 4) { e.fail("policy weight out of range"); return report(KVS_EINVAL, e, err, err_len); }
      lp.w[i] = (uint8_t)policy[6 + i];
    }
  }
  parallel_for(L, threads, [&](uint32_t l) {
    const int g = kvc_layer_group(l, L);
    for (uint32_t s = 0; s < h.segments(); s++) {
      const uint8_t* seg = static_cast<const uint8_t*>(src) + ((uint64_t)l * h.segments() + s) * seg_elems * B;
      if (level == KVC_LEVEL_LOSSLESS) encode_lossless_segment(seg, dtype, seg_elems, layers[l]);
      else encode_lossy_segment(seg, dtype, T, (uint32_t)h.channels(), h.lanes, lp.off[s][g], lp.w[s], layers[l]);
    }
  });
  for (uint32_t l = 0; l < L; l++)
    if (layers[l].size() > 0xFFFFFFFFull) {
      e.fail("layer %u encodes to more than 4 GiB", l);
      return report(KVS_EINVAL, e, err, err_len);
    }
  std::vector<uint8_t> out;
  write_container(h, layers, out);
  if (out_size) *out_size = out.size();
  if (dst == nullptr || dst_cap < out.size()) {
    e.fail("output buffer of %llu bytes too small, need %zu", (unsigned long long)dst_cap, out.size());
    return report(KVS_ENOSPC, e, err, err_len);
  }
  memcpy(dst, out.data(), out.size());
  return KVS_OK;
}

KVS_API void kvs_codec_debug_convert(const float* in, uint16_t* out, uint64_t n, int dtype) {
  for (uint64_t i = 0; i < n; i++) out[i] = dtype == KVC_DTYPE_BF16 ? kvc_float_to_bf16(in[i]) : kvc_float_to_half(in[i]);
}

KVS_API int kvs_codec_parse(const uint8_t* buf, uint64_t n, kvs_codec_info* info, char* err, size_t err_len) {
  Error e;
  Header h;
  std::vector<IndexEntry> idx;
  if (!parse_container(buf, n, h, idx, false, e)) return report(KVS_ECORRUPT, e, err, err_len);
  if (info) {
    info->version = KVC_VERSION;
    info->codec = h.codec; info->level = h.level; info->dtype = h.dtype; info->layout = h.layout;
    info->layers = h.layers; info->tokens = h.tokens; info->heads = h.heads; info->head_dim = h.head_dim;
    info->payload_size = h.payload_size;
    info->decoded_bytes = h.elements() * kvc_dtype_size(h.dtype);
    info->payload_offset = h.payload_offset();
    info->lanes = h.lanes;
  }
  return KVS_OK;
}

KVS_API int kvs_codec_decode_layers(const uint8_t* buf, uint64_t n, uint32_t first, uint32_t count, void* dst, uint64_t dst_bytes,
                      int threads, int verify, char* err, size_t err_len) {
  Error e;
  Header h;
  std::vector<IndexEntry> idx;
  if (!parse_container(buf, n, h, idx, false, e)) return report(KVS_ECORRUPT, e, err, err_len);
  if (first > h.layers || count > h.layers - first) {
    e.fail("layers [%u, %u) outside 0..%u", first, first + count, h.layers);
    return report(KVS_EINVAL, e, err, err_len);
  }
  const uint64_t B = kvc_dtype_size(h.dtype), per_layer = h.layer_elements() * B;
  if (dst == nullptr || dst_bytes != per_layer * count) {
    e.fail("destination has %llu bytes, %u layers need %llu", (unsigned long long)dst_bytes, count,
           (unsigned long long)(per_layer * count));
    return report(KVS_EINVAL, e, err, err_len);
  }
  const uint8_t* payload = buf + h.payload_offset();
  std::vector<Error> errs(count);
  std::vector<int> codes(count, KVS_OK);
  parallel_for(count, threads, [&](uint32_t i) {
    const IndexEntry& ie = idx[first + i];
    const uint8_t* p = payload + ie.offset;
    const uint8_t* end = p + ie.size;
    if (verify && crc32c(p, ie.size) != ie.crc) {
      errs[i].fail("layer %u checksum mismatch (corrupt payload)", first + i);
      codes[i] = KVS_ECHECKSUM;
      return;
    }
    const uint64_t seg_elems = (uint64_t)h.tokens * h.channels();
    for (uint32_t s = 0; s < h.segments(); s++) {
      uint8_t* out = static_cast<uint8_t*>(dst) + per_layer * i + s * seg_elems * B;
      bool ok = h.level == KVC_LEVEL_LOSSLESS
                    ? decode_lossless_segment(&p, end, out, h.dtype, seg_elems, errs[i])
                    : decode_lossy_segment(&p, end, out, h.dtype, h.tokens, (uint32_t)h.channels(), h.lanes, errs[i]);
      if (!ok) {
        Error tagged;
        tagged.fail("layer %u segment %u: %s", first + i, s, errs[i].msg.c_str());
        errs[i] = tagged;
        codes[i] = KVS_ECORRUPT;
        return;
      }
    }
    if (p != end) {
      errs[i].fail("layer %u has %zu trailing bytes", first + i, (size_t)(end - p));
      codes[i] = KVS_ECORRUPT;
    }
  });
  for (uint32_t i = 0; i < count; i++)
    if (codes[i] != KVS_OK) return report(codes[i], errs[i], err, err_len);
  return KVS_OK;
}

KVS_API int kvs_codec_size_breakdown(const uint8_t* buf, uint64_t n, uint64_t* out3, char* err, size_t err_len) {
  Error e;
  Header h;
  std::vector<IndexEntry> idx;
  if (!parse_container(buf, n, h, idx, false, e)) return report(KVS_ECORRUPT, e, err, err_len);
  uint64_t tables = 0, lanes = 0, data = 0;
  const uint8_t* payload = buf + h.payload_offset();
  for (uint32_t l = 0; l < h.layers; l++) {
    const uint8_t* p = payload + idx[l].offset;
    const uint8_t* end = p + idx[l].size;
    if (h.level == KVC_LEVEL_LOSSLESS) {  // tables = plane headers
      const uint64_t before = idx[l].size;
      (void)before;
      data += idx[l].size;  // lossless: reported as data; tables are < 1%
      continue;
    }
    for (uint32_t s = 0; s < h.segments() && p < end; s++) {
      const uint64_t C = h.channels();
      const uint32_t nl = (uint32_t)std::min<uint64_t>(h.lanes, C);
      if (end - p < 2) { e.fail("truncated segment"); return report(KVS_ECORRUPT, e, err, err_len); }
      const uint64_t R = read16(p), raw = 2 + 4 * R + R * C * kvc_dtype_size(h.dtype);
      if (R > KVC_MAX_RAW_TOKENS || raw > (uint64_t)(end - p)) { e.fail("bad raw tokens"); return report(KVS_ECORRUPT, e, err, err_len); }
      tables += 2 + 4 * R;
      data += R * C * kvc_dtype_size(h.dtype);
      p += raw;
      if (C * KVC_CHANNEL_META_SIZE > (uint64_t)(end - p)) { e.fail("truncated segment"); return report(KVS_ECORRUPT, e, err, err_len); }
      tables += C * KVC_CHANNEL_META_SIZE;
      p += C * KVC_CHANNEL_META_SIZE;
      LaneSpan spans[KVC_MAX_LANES];
      if (!read_lane_table(&p, end, nl, spans, e)) return report(KVS_ECORRUPT, e, err, err_len);
      lanes += (uint64_t)nl * KVC_LANE_ENTRY_SIZE;
      for (uint32_t j = 0; j < nl; j++) data += spans[j].end - spans[j].begin;
    }
  }
  out3[0] = tables; out3[1] = lanes; out3[2] = data;
  return KVS_OK;
}
