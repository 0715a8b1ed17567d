// Default encoder policy of each lossy level (host only). The bitstream does not depend on
// it: decoders read the per-channel step codes. Tuned with bench/codec_quality.py.
#pragma once
#include "kvc_common.h"

static inline const kvc_level_params& kvc_level_defaults(int level) {
  static const kvc_level_params p[KVC_NUM_LEVELS] = {
      // {{K offsets shallow, middle, deep}, {V offsets ...}}, {K weight, V weight}
      {{{0, 0, 0}, {0, 0, 0}}, {0, 0}},             // lossless (unused)
      {{{-6, -6, -5}, {-6, -6, -5}}, {0, 0}},       // near-lossless
      {{{-2, -1, 0}, {-2, -1, 0}}, {0, 0}},         // default
      {{{0, 1, 2}, {0, 1, 2}}, {0, 0}},             // aggressive
  };
  return p[level];
}
