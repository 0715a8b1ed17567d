"""Argument checks of the batched GPU codec wrappers that hold without a GPU (they raise
CodecError before the CUDA library is touched)."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore_native.codec as kc
from kvstore_native.codec import gpu


def test_unknown_decoder_is_rejected():
    with pytest.raises(kc.CodecError, match="unknown decoder"):
        gpu.set_decoder("fastest")


def test_unknown_encoder_is_rejected():
    with pytest.raises(kc.CodecError, match="unknown encoder"):
        gpu.set_encoder("fastest")


@pytest.mark.parametrize("args", [([], [], [], 8), ([1], [8], [], 8), ([1, 2], [8], [3, 4], 8)])
def test_load_batch_ptrs_needs_equal_nonempty_lists(args):
    with pytest.raises(kc.CodecError, match="non-empty"):
        gpu.load_batch_ptrs(*args, 0)


def test_load_batch_needs_equal_nonempty_lists():
    with pytest.raises(kc.CodecError):
        gpu.load_batch([], [])
    with pytest.raises(kc.CodecError):
        gpu.load_batch([b"x"], [])


def test_encode_batch_needs_sources():
    with pytest.raises(kc.CodecError, match="non-empty"):
        gpu.encode_batch_into([], kc.CodecLevel.DEFAULT, np.empty(16, np.uint8))


def test_decoder_names_match_the_abi():
    # include/kvstore.h, kvs_cuda_codec_set_decoder: 0 first, 1/2 shared models, 3/4 global models,
    # 5 shared models with the shorter symbol chain
    assert gpu.DECODERS == {"first": 0, "warp-smem": 1, "warp-smem-hw": 2, "warp-global": 3, "warp-global-hw": 4,
                            "warp-smem-hw-short": 5}
    # kvs_cuda_codec_set_encoder: 0 global-memory statistics, 1 shared-memory tile
    assert gpu.ENCODERS == {"global": 0, "tile": 1}
