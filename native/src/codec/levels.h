// Default encoder policy of each lossy level (host only). The bitstream does not depend on
// it: decoders read the per-channel step codes. Tuned with bench/codec_quality.py.
#pragma once
#include "common.h"

static inline const kvc_level_params& kvc_level_defaults(int level) {
  static const kvc_level_params p[KVC_NUM_LEVELS] = {
      // {{K offsets shallow, middle, deep}, {V offsets ...}}, {K weight, V weight}
      {{{0, 0, 0}, {0, 0, 0}}, {0, 0}},             // lossless (unused)
      {{{2, 0, -2}, {2, 0, -2}}, {0, 0}},           // near-lossless
      {{{8, 5, 3}, {8, 5, 3}}, {0, 0}},             // default
      {{{8, 8, 6}, {8, 8, 6}}, {0, 0}},             // aggressive
  };
  return p[level];
}
