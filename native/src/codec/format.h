// Container header and per-layer index of the KV bitstream (docs/bitstream.md).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "common.h"
#include "kvstore.h"

namespace kvc {

// Parsed, validated header. Mirrors `struct kvc_info` of the C ABI.
struct Header {
  uint8_t codec = KVC_CODEC_RANS_V1;
  uint8_t level = 0;
  uint8_t dtype = 0;
  uint8_t layout = 0;
  uint8_t lanes = KVC_LANES_DEFAULT;  // rANS lanes per lossy segment (32 for lossless)
  uint32_t layers = 0, tokens = 0, heads = 0, head_dim = 0;
  uint64_t payload_size = 0;

  uint32_t segments() const { return layout == KVC_LAYOUT_KV ? 2u : 1u; }
  uint64_t channels() const { return (uint64_t)heads * head_dim; }
  uint64_t layer_elements() const { return segments() * (uint64_t)tokens * channels(); }
  uint64_t elements() const { return layers * layer_elements(); }
  uint64_t index_offset() const { return KVC_HEADER_SIZE; }
  uint64_t payload_offset() const { return KVC_HEADER_SIZE + (uint64_t)KVC_INDEX_ENTRY_SIZE * layers; }
};

struct IndexEntry {
  uint64_t offset;  // relative to the payload start
  uint32_t size;
  uint32_t crc;
};

// Error sink: a message for the caller, set once at the first failure.
struct Error {
  std::string msg;
  bool fail(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
};

// Copies e's message into (err, err_len) and returns `code` (a negative KVS_E* value).
int report(int code, const Error& e, char* err, size_t err_len);

// The library's CRC32C (kvs_crc32c) of n bytes, from the start.
inline uint32_t crc32c(const void* data, size_t n) { return kvs_crc32c(0, data, n); }

// Sets h.lanes from an encoder's `lanes` argument (0: the level's default) or fails with a
// message naming the choices (32, 64 or 128 for the lossy levels, 32 for lossless).
bool set_lanes(Header& h, int level, int lanes, Error& err);

// Validates the shape fields of `h` (used by the encoder and the parser).
bool check_shape(const Header& h, Error& err);

// Serialise header + index (layer sizes/CRCs already known) into `out` (resized).
void write_container(const Header& h, const std::vector<std::vector<uint8_t>>& layer_payloads,
                     std::vector<uint8_t>& out);

// Write the 64-byte header and the index (n = layers entries) into out; out must have
// h.payload_offset() bytes. sizes/crcs are per layer; payload_size must already be set.
void write_header_index(const Header& h, const uint32_t* sizes, const uint32_t* crcs, uint8_t* out);

// Parse and validate header + index of `buf` (n bytes). With `verify_payload`, also check
// every layer's CRC32C. The index is contiguous and covers exactly the payload.
bool parse_container(const uint8_t* buf, size_t n, Header& h, std::vector<IndexEntry>& index,
                     bool verify_payload, Error& err);

}  // namespace kvc
