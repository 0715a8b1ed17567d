// Byte-oriented rANS (32-bit state, 12-bit probabilities, one byte per renormalisation
// step). One lane = one independent stream; a segment interleaves up to 32 lanes.
// The encoder pushes symbols in reverse and its bytes come out reversed; the container
// stores each lane's bytes in decoder (forward) order and the encoder's final state.
#pragma once
#include <stdint.h>
#include <vector>
#include "common.h"

namespace kvc {

struct RansEncoder {
  uint32_t x = KVC_RANS_L;
  std::vector<uint8_t> rev;  // bytes in reverse order
  inline void put(uint32_t start, uint32_t freq) {
    const uint32_t x_max = ((KVC_RANS_L >> KVC_PROB_BITS) << 8) * freq;
    while (x >= x_max) { rev.push_back((uint8_t)(x & 0xFF)); x >>= 8; }
    x = ((x / freq) << KVC_PROB_BITS) + (x % freq) + start;
  }
  // Bytes in decoder order.
  void finish(std::vector<uint8_t>& out) const { out.assign(rev.rbegin(), rev.rend()); }
};

// Decoder state of one lane. All reads are bounds-checked against `end`.
struct RansDecoder {
  uint32_t x;
  const uint8_t* p;
  const uint8_t* end;
  // One conditional renormalisation byte, without branches (reads past end yield 0).
  inline void renorm() {
    static const uint8_t zero = 0;
    const uint32_t need = x < KVC_RANS_L;
    const uint8_t* src = p < end ? p : &zero;
    x = (x << (need << 3)) | (*src & (0u - need));
    p += need;
  }
  inline uint32_t slot() const { return x & (KVC_PROB_TOTAL - 1); }
  // Advance past a symbol with (start, freq). Branchless: a symbol of probability >= 2^-12
  // needs at most two renormalisation bytes; reads past `end` yield 0 and move p beyond end,
  // which finished_cleanly() rejects.
  inline void advance(uint32_t start, uint32_t freq) {
    x = freq * (x >> KVC_PROB_BITS) + slot() - start;
    renorm();
    renorm();
  }
  // Decode one symbol with packed entries (see pack_entry in segment.h).
  inline uint8_t decode(const uint32_t* entry) {
    const uint32_t e = entry[slot()];
    x = (((e >> 8) & 0xFFFu) + 1u) * (x >> KVC_PROB_BITS) + (e >> 20);
    renorm();
    renorm();
    return (uint8_t)(e & 0xFFu);
  }
  // A lane ends exactly where the encoder started: state L and every byte consumed.
  inline bool finished_cleanly() const { return x == KVC_RANS_L && p == end; }
};

}  // namespace kvc
