"""CacheGen's controller on the wire: pick the codec level from the measured link and a budget.

For a chunk of ``n`` tokens and ``raw`` RAW bytes, the expected load time at level ``l`` is
``size_l / throughput + raw / decode_rate_l`` (transfer, then decode), where ``size_l`` is
``raw * ratio_l`` and ``throughput`` an EWMA of bytes/s over recent transfers. ``ratio_l``
and ``decode_rate_l`` are measured once per process on the first real chunk
(``calibrate_once``: every level encoded and decoded, replacing the fp16 priors), then
refined by every encode and decode (EWMA). The controller picks the best-quality allowed
level whose expected load time per token is within ``remote.load_budget_us_per_token``; when none fits
it picks the allowed level with the smallest expected load time. Allowed levels are those
no worse than the floor: ``remote.min_quality`` or a per-namespace override
(``floor_for(namespace_id)``, e.g. a tenant that forbids lossy levels).

Thread-safe (one lock; called from the uploader thread and request worker threads).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ...config import CODEC_QUALITY_ORDER, RemoteConfig, TierCodec
from ...errors import KVStoreError

log = logging.getLogger(__name__)

#: Transfers smaller than this are latency-dominated and say little about bandwidth.
MIN_SAMPLE_BYTES = 64 * 1024
#: Encoded/RAW size per level before any encode was seen: SmolLM2 fp16 KV, docs/benchmarks.md
#: (Codec, bits/element / 16).
PRIOR_RATIO = {TierCodec.LOSSLESS: 0.86, TierCodec.NEAR_LOSSLESS: 0.217,
               TierCodec.DEFAULT: 0.145, TierCodec.AGGRESSIVE: 0.113}
#: RAW bytes/s one core decodes per level before any decode was timed (same table, CPU speed).
PRIOR_DECODE_BYTES_PER_S = {TierCodec.LOSSLESS: 202e6, TierCodec.NEAR_LOSSLESS: 141e6,
                            TierCodec.DEFAULT: 121e6, TierCodec.AGGRESSIVE: 108e6}
#: The same priors for 4-byte (fp32) KV: lossless keeps every mantissa bit (about the fp16
#: ratio, decoded slower) while lossy levels store about as many bits per element as for fp16
#: (half the ratio, twice the RAW bytes/s). Measured by ``calibrate_once`` on SmolLM2 fp32 KV
#: on the 2-core development VM (docs/remote.md, Adaptive codec).
PRIOR_RATIO_FP32 = {TierCodec.LOSSLESS: 0.84, TierCodec.NEAR_LOSSLESS: 0.111,
                    TierCodec.DEFAULT: 0.075, TierCodec.AGGRESSIVE: 0.059}
PRIOR_DECODE_BYTES_PER_S_FP32 = {TierCodec.LOSSLESS: 110e6, TierCodec.NEAR_LOSSLESS: 518e6,
                                 TierCodec.DEFAULT: 411e6, TierCodec.AGGRESSIVE: 416e6}
#: Element size (bytes) -> (ratio priors, decode-rate priors); others use the fp16 table.
_PRIORS = {4: (PRIOR_RATIO_FP32, PRIOR_DECODE_BYTES_PER_S_FP32)}
#: Weight of a new size-ratio or decode-rate sample (slow: they depend on the data, not the link).
_MODEL_ALPHA = 0.1

#: Hook: namespace id -> the floor for it, or None to use ``remote.min_quality``.
FloorHook = Callable[[bytes], "TierCodec | None"]
#: ``(cid, RAW meta, RAW payload, level) -> (encoded bytes, seconds to decode them)``: one
#: real chunk through the codec at ``level`` and back (``wiring.codec_trial``); raises
#: ValueError/KVStoreError when the codec cannot take the chunk.
Trial = Callable[[bytes, object, object, TierCodec], tuple[int, float]]
#: Hook: namespace id -> bytes per KV element of its dtype (None when unknown).
ElementBytes = Callable[[bytes], "int | None"]


class ThroughputMeter:
    """EWMA of bytes/s over recent transfers (each sample = one transfer's bytes and time)."""

    def __init__(self, initial_bytes_per_s: float, alpha: float) -> None:
        self._bps = initial_bytes_per_s
        self._alpha = alpha
        self._lock = threading.Lock()
        self.samples = 0

    def sample(self, nbytes: int, seconds: float) -> None:
        if nbytes < MIN_SAMPLE_BYTES or seconds <= 0:
            return
        with self._lock:
            self._bps += self._alpha * (nbytes / seconds - self._bps)
            self.samples += 1

    @property
    def bytes_per_s(self) -> float:
        return self._bps


@dataclass(frozen=True, slots=True)
class Decision:
    level: TierCodec
    expected_us_per_token: float
    within_budget: bool


def allowed_levels(floor: TierCodec) -> tuple[TierCodec, ...]:
    """Levels no worse than ``floor``, best quality first."""
    return CODEC_QUALITY_ORDER[: CODEC_QUALITY_ORDER.index(floor) + 1]


class AdaptiveController:
    def __init__(self, cfg: RemoteConfig, meter: ThroughputMeter, floor_for: FloorHook | None = None,
                 trial: Trial | None = None, element_bytes: ElementBytes | None = None) -> None:
        self._budget_s = cfg.load_budget_us_per_token * 1e-6
        self._floor = cfg.min_quality
        self._fixed = cfg.fixed_level
        self._floor_for = floor_for
        self.meter = meter
        self._ratio = dict(PRIOR_RATIO)
        self._decode = dict(PRIOR_DECODE_BYTES_PER_S)
        self._trial = trial
        self._element_bytes = element_bytes
        self._priors_set = False
        self._measured = False   # calibrate_once replaced the priors
        #: None: not measured yet; False: being measured; True: measured (``calibrate_once``).
        self._calibrated: bool | None = None if trial is not None else True
        self._lock = threading.Lock()
        #: Decisions made so far: ("upload" | "fetch", level) -> count (exported as metrics).
        self.decisions: Counter[tuple[str, TierCodec]] = Counter()

    def floor(self, namespace_id: bytes) -> TierCodec:
        hook = self._floor_for(namespace_id) if self._floor_for is not None else None
        return hook if hook is not None else self._floor

    def expected_s(self, level: TierCodec, raw_bytes: int, wire_bytes: int | None = None) -> float:
        """Transfer + decode time of one chunk at ``level`` (``wire_bytes`` when known)."""
        with self._lock:
            size = wire_bytes if wire_bytes is not None else raw_bytes * self._ratio[level]
            return size / self.meter.bytes_per_s + raw_bytes / self._decode[level]

    def raw_bytes(self, level: TierCodec, wire_bytes: int) -> int:
        """RAW bytes that ``wire_bytes`` stored at ``level`` decode to (the learned ratio)."""
        with self._lock:
            return int(wire_bytes / self._ratio[level])

    def _levels(self, namespace_id: bytes) -> tuple[TierCodec, ...]:
        """The levels to choose from: ``fixed_level`` alone when set (if the floor allows it),
        else every level no worse than the floor."""
        allowed = allowed_levels(self.floor(namespace_id))
        return (self._fixed,) if self._fixed is not None and self._fixed in allowed else allowed

    def choose(self, namespace_id: bytes, num_tokens: int, raw_bytes: int, purpose: str = "upload") -> Decision:
        self.priors_for(namespace_id)
        levels = self._levels(namespace_id)
        n = max(1, num_tokens)
        timed = [(lv, self.expected_s(lv, raw_bytes) / n) for lv in levels]
        fit = next(((lv, t) for lv, t in timed if t <= self._budget_s), None)
        lv, t = fit if fit is not None else min(timed, key=lambda x: x[1])
        self.record(purpose, lv)
        return Decision(lv, t * 1e6, fit is not None)

    def record(self, purpose: str, level: TierCodec) -> None:
        with self._lock:
            self.decisions[(purpose, level)] += 1

    def small_level(self, namespace_id: bytes) -> TierCodec:
        """The smallest level allowed for the namespace (the companion copy's level)."""
        return self._levels(namespace_id)[-1]

    def fits(self, level: TierCodec, num_tokens: int, raw_bytes: int, wire_bytes: int) -> bool:
        return self.expected_s(level, raw_bytes, wire_bytes) / max(1, num_tokens) <= self._budget_s

    def priors_for(self, namespace_id: bytes) -> None:
        """Before anything was measured, takes the priors of the namespace's element size
        (fp32 KV differs from fp16 by 2x and in the order of the levels); the first namespace
        seen decides (one dominant model per daemon). Measurements always win."""
        if self._priors_set or self._element_bytes is None:
            return
        try:
            size = self._element_bytes(namespace_id)
        except KVStoreError:
            return  # unknown namespace: stay on the default priors for now
        with self._lock:
            if self._priors_set or self._measured:
                return
            self._priors_set = True
            if size in _PRIORS:
                ratio, decode = _PRIORS[size]
                self._ratio, self._decode = dict(ratio), dict(decode)

    @property
    def calibrated(self) -> bool:
        return self._calibrated is True

    def calibrate_once(self, cid: bytes, meta, payload) -> bool:
        """Measures every level on one real RAW chunk (size ratio and single-thread decode
        rate on this CPU, for this KV), replacing the priors, the first time it is called
        (later calls, and calls while it runs, return at once). ``payload`` must be the
        exact KV (a put, or a lossless fetch): KV that a lossy level already quantized
        re-encodes at other sizes and speeds than real KV. Seconds of codec work: call
        it off the request path (the uploader's thread, a prefetch thread). False when
        nothing was measured (no trial, or the codec refused the chunk: priors are kept)."""
        with self._lock:
            if self._calibrated is not None:
                return False
            self._calibrated = False
        measured = {}
        for level in CODEC_QUALITY_ORDER:
            try:
                size, seconds = self._trial(cid, meta, payload, level)
            except (ValueError, KVStoreError) as e:
                log.info("adaptive controller: cannot calibrate on chunk %s (%s); keeping the priors",
                         bytes(cid).hex()[:16], e)
                break
            if seconds > 0:
                measured[level] = (size / meta.payload_bytes, meta.payload_bytes / seconds)
        with self._lock:
            for level, (ratio, rate) in measured.items():
                self._ratio[level], self._decode[level] = ratio, rate
            self._calibrated = True
            self._measured = self._measured or bool(measured)
        if measured:
            log.info("adaptive controller calibrated: %s", ", ".join(
                f"{lv.value} {r:.3f}x, decode {d / 1e6:.0f} MB/s" for lv, (r, d) in measured.items()))
        return bool(measured)

    def observe_encode(self, level: TierCodec, raw_bytes: int, encoded_bytes: int) -> None:
        if raw_bytes <= 0:
            return
        with self._lock:
            self._ratio[level] += _MODEL_ALPHA * (encoded_bytes / raw_bytes - self._ratio[level])

    def observe_decode(self, level: TierCodec, raw_bytes: int, seconds: float) -> None:
        if raw_bytes < MIN_SAMPLE_BYTES or seconds <= 0:
            return
        with self._lock:
            self._decode[level] += _MODEL_ALPHA * (raw_bytes / seconds - self._decode[level])

    def snapshot(self) -> dict:
        with self._lock:
            return {"throughput_bytes_per_s": self.meter.bytes_per_s,
                    "ratio": {k.value: v for k, v in self._ratio.items()},
                    "decode_bytes_per_s": {k.value: v for k, v in self._decode.items()},
                    "calibrated": self._calibrated is True,
                    "decisions": {f"{p}:{lv.value}": c for (p, lv), c in self.decisions.items()}}
