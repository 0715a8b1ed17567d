// Segment codecs: one segment is the [tokens, channels] matrix of one (layer, K|V) (or one
// MLA layer). Layout of the bytes: docs/bitstream.md, "Lossy segment", "Lossless segment".
#pragma once
#include <stdint.h>

#include <vector>

#include "format.h"

namespace kvc {

// Static lossy models, expanded once from tables.h (cumulative + slot lookup).
struct Models {
  uint16_t limit[KVC_NUM_MODELS];
  uint16_t freq[KVC_NUM_MODELS][256];
  uint16_t cum[KVC_NUM_MODELS][257];
  uint8_t lookup[KVC_NUM_MODELS][KVC_PROB_TOTAL];
  // Decode entry per slot: symbol | (freq - 1) << 8 | (slot - cum) << 20 (one load per symbol).
  uint32_t entry[KVC_NUM_MODELS][KVC_PROB_TOTAL];
};

inline uint32_t pack_entry(uint32_t sym, uint32_t freq, uint32_t bias) { return sym | ((freq - 1) << 8) | (bias << 20); }
const Models& models();

// `lanes`: the header's lane count (32, 64 or 128); a segment uses min(lanes, channels).
void encode_lossy_segment(const void* src, int dtype, uint32_t tokens, uint32_t channels, uint32_t lanes,
                          int32_t step_offset, int32_t channel_weight, std::vector<uint8_t>& out);
// Decodes from [*p, end), advancing *p. dst receives tokens*channels elements of dtype.
bool decode_lossy_segment(const uint8_t** p, const uint8_t* end, void* dst, int dtype,
                          uint32_t tokens, uint32_t channels, uint32_t lanes, Error& err);

void encode_lossless_segment(const void* src, int dtype, uint64_t n, std::vector<uint8_t>& out);
bool decode_lossless_segment(const uint8_t** p, const uint8_t* end, void* dst, int dtype,
                             uint64_t n, Error& err);

// Little-endian helpers shared by the segment codecs.
inline void append16(std::vector<uint8_t>& v, uint32_t x) { v.push_back((uint8_t)x); v.push_back((uint8_t)(x >> 8)); }
inline void append32(std::vector<uint8_t>& v, uint32_t x) { for (int i = 0; i < 4; i++) v.push_back((uint8_t)(x >> (8 * i))); }
inline uint32_t read16(const uint8_t* p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
inline uint32_t read32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// Lane table: n lanes of (u32 length, u32 final state). Validates and sets up decoders.
struct LaneSpan { const uint8_t* begin; const uint8_t* end; uint32_t state; };
bool read_lane_table(const uint8_t** p, const uint8_t* end, uint32_t n, LaneSpan* lanes, Error& err);

}  // namespace kvc
