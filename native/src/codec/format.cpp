#include "format.h"

#include <stdarg.h>
#include <stdio.h>

#include "error.h"

namespace kvc {
namespace {

inline void put16(uint8_t* p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
inline void put32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
inline void put64(uint8_t* p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
inline uint16_t get16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
inline uint32_t get32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
inline uint64_t get64(const uint8_t* p) { return (uint64_t)get32(p) | ((uint64_t)get32(p + 4) << 32); }

}  // namespace

bool Error::fail(const char* fmt, ...) {
  if (msg.empty()) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    msg = buf;
  }
  return false;
}

int report(int code, const Error& e, char* err, size_t err_len) {
  return kvs::fail(err, err_len, code, "%s", e.msg.c_str());
}

bool check_shape(const Header& h, Error& err) {
  if (h.codec != KVC_CODEC_RANS_V1) return err.fail("unknown codec id %u (this build knows 1)", h.codec);
  if (h.level >= KVC_NUM_LEVELS) return err.fail("unknown level %u (0..%d)", h.level, KVC_NUM_LEVELS - 1);
  if (kvc_dtype_size(h.dtype) == 0) return err.fail("unknown dtype id %u (1 fp16, 2 bf16, 3 fp32)", h.dtype);
  if (h.layout != KVC_LAYOUT_KV && h.layout != KVC_LAYOUT_MLA)
    return err.fail("unknown layout id %u (1 KV, 2 MLA)", h.layout);
  if (h.layout == KVC_LAYOUT_MLA && h.heads != 1) return err.fail("MLA layout needs heads == 1, got %u", h.heads);
  if (h.layers == 0 || h.layers > KVC_MAX_LAYERS) return err.fail("layers %u out of range 1..%u", h.layers, KVC_MAX_LAYERS);
  if (h.tokens == 0 || h.tokens > KVC_MAX_TOKENS) return err.fail("tokens %u out of range 1..%u", h.tokens, KVC_MAX_TOKENS);
  if (h.heads == 0 || h.head_dim == 0 || h.heads > KVC_MAX_CHANNELS || h.head_dim > KVC_MAX_CHANNELS ||
      h.channels() > KVC_MAX_CHANNELS)
    return err.fail("heads*head_dim (%u*%u) out of range 1..%u", h.heads, h.head_dim, KVC_MAX_CHANNELS);
  // products below cannot overflow: each factor is bounded above
  if (h.elements() > KVC_MAX_ELEMENTS)
    return err.fail("chunk of %llu elements exceeds the limit %llu", (unsigned long long)h.elements(),
                    (unsigned long long)KVC_MAX_ELEMENTS);
  if (!kvc_lanes_valid(h.lanes) || (h.level == KVC_LEVEL_LOSSLESS && h.lanes != KVC_LOSSLESS_LANES))
    return err.fail("lanes %u not supported (32, 64 or 128 for the lossy levels, 32 for lossless)", h.lanes);
  if (h.level != KVC_LEVEL_LOSSLESS && (uint64_t)h.tokens * 4u * 8u > 0xFFFFFFFFull)
    return err.fail("too many tokens for one lossy segment");
  return true;
}

bool set_lanes(Header& h, int level, int lanes, Error& err) {
  if (lanes == 0) lanes = level == KVC_LEVEL_LOSSLESS ? (int)KVC_LOSSLESS_LANES : (int)KVC_LANES_DEFAULT;
  if (lanes < 0 || !kvc_lanes_valid((unsigned)lanes) || (level == KVC_LEVEL_LOSSLESS && lanes != (int)KVC_LOSSLESS_LANES))
    return err.fail("lanes %d not supported: 32, 64 or 128 for the lossy levels, 32 (or 0) for lossless", lanes);
  h.lanes = (uint8_t)lanes;
  return true;
}

void write_header_index(const Header& h, const uint32_t* sizes, const uint32_t* crcs, uint8_t* p) {
  uint8_t* idx = p + KVC_HEADER_SIZE;
  uint64_t off = 0;
  for (uint32_t i = 0; i < h.layers; i++) {
    put64(idx + 16 * i, off);
    put32(idx + 16 * i + 8, sizes[i]);
    put32(idx + 16 * i + 12, crcs[i]);
    off += sizes[i];
  }
  memset(p, 0, KVC_HEADER_SIZE);
  memcpy(p, KVC_MAGIC, 4);
  put16(p + 4, KVC_VERSION);
  put16(p + 6, KVC_HEADER_SIZE);
  p[8] = h.codec; p[9] = h.level; p[10] = h.dtype; p[11] = h.layout;
  put32(p + 12, h.layers); put32(p + 16, h.tokens); put32(p + 20, h.heads); put32(p + 24, h.head_dim);
  put32(p + 28, 0);  // flags
  p[32] = KVC_PROB_BITS; p[33] = h.lanes; put16(p + 34, 0);
  put64(p + 36, h.payload_size);
  put32(p + 44, crc32c(idx, (size_t)KVC_INDEX_ENTRY_SIZE * h.layers));
  put32(p + 60, crc32c(p, 60));
}

void write_container(const Header& hin, const std::vector<std::vector<uint8_t>>& layers,
                     std::vector<uint8_t>& out) {
  Header h = hin;
  h.payload_size = 0;
  for (auto& l : layers) h.payload_size += l.size();
  const uint64_t po = h.payload_offset();
  out.assign(po + h.payload_size, 0);
  std::vector<uint32_t> sizes(layers.size()), crcs(layers.size());
  uint64_t off = 0;
  for (size_t i = 0; i < layers.size(); i++) {
    sizes[i] = (uint32_t)layers[i].size();
    crcs[i] = crc32c(layers[i].data(), layers[i].size());
    if (!layers[i].empty()) memcpy(out.data() + po + off, layers[i].data(), layers[i].size());
    off += layers[i].size();
  }
  write_header_index(h, sizes.data(), crcs.data(), out.data());
}

bool parse_container(const uint8_t* buf, size_t n, Header& h, std::vector<IndexEntry>& index,
                     bool verify_payload, Error& err) {
  if (buf == nullptr || n < KVC_HEADER_SIZE)
    return err.fail("bitstream too short: %zu bytes, header needs %d", n, KVC_HEADER_SIZE);
  if (memcmp(buf, KVC_MAGIC, 4) != 0) return err.fail("bad magic: not a kvstore codec bitstream");
  if (get16(buf + 4) != KVC_VERSION)
    return err.fail("unsupported bitstream version %u (this build reads %d)", get16(buf + 4), KVC_VERSION);
  if (get16(buf + 6) != KVC_HEADER_SIZE) return err.fail("bad header size %u", get16(buf + 6));
  if (crc32c(buf, 60) != get32(buf + 60)) return err.fail("header checksum mismatch (corrupt header)");
  h.codec = buf[8]; h.level = buf[9]; h.dtype = buf[10]; h.layout = buf[11];
  h.layers = get32(buf + 12); h.tokens = get32(buf + 16); h.heads = get32(buf + 20); h.head_dim = get32(buf + 24);
  if (get32(buf + 28) != 0) return err.fail("unknown flags 0x%x", get32(buf + 28));
  if (buf[32] != KVC_PROB_BITS || !kvc_lanes_valid(buf[33]) || get16(buf + 34) != 0)
    return err.fail("unsupported coder parameters (prob_bits %u, lanes %u)", buf[32], buf[33]);
  h.lanes = buf[33];
  for (int i = 48; i < 60; i++)
    if (buf[i] != 0) return err.fail("reserved header byte %d is not zero", i);
  h.payload_size = get64(buf + 36);
  if (!check_shape(h, err)) return false;
  const uint64_t po = h.payload_offset();
  if (po > n) return err.fail("truncated: index needs %llu bytes, have %zu", (unsigned long long)po, n);
  if (h.payload_size != n - po)
    return err.fail("size mismatch: header says %llu payload bytes, buffer has %llu (truncated or trailing data)",
                    (unsigned long long)h.payload_size, (unsigned long long)(n - po));
  const uint8_t* idx = buf + KVC_HEADER_SIZE;
  if (crc32c(idx, (size_t)KVC_INDEX_ENTRY_SIZE * h.layers) != get32(buf + 44))
    return err.fail("layer index checksum mismatch (corrupt index)");
  index.resize(h.layers);
  uint64_t expect = 0;
  for (uint32_t i = 0; i < h.layers; i++) {
    IndexEntry& e = index[i];
    e.offset = get64(idx + 16 * i);
    e.size = get32(idx + 16 * i + 8);
    e.crc = get32(idx + 16 * i + 12);
    if (e.offset != expect || e.size > h.payload_size - e.offset)
      return err.fail("layer %u: offset %llu / size %u outside the payload", i, (unsigned long long)e.offset, e.size);
    expect += e.size;
    if (verify_payload && crc32c(buf + po + e.offset, e.size) != e.crc)
      return err.fail("layer %u checksum mismatch (corrupt payload)", i);
  }
  if (expect != h.payload_size) return err.fail("layer index does not cover the payload");
  return true;
}

}  // namespace kvc
