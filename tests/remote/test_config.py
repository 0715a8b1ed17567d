"""The [remote] and [events] config sections: defaults, environment overrides, rejections."""

from __future__ import annotations

import pytest

from kvstore.config import EventEncoding, TierCodec, load_config
from kvstore.errors import InvalidArgument


def test_remote_and_events_from_env_and_overrides():
    cfg = load_config(env={"KVSTORE_REMOTE__NODES": '["redis-0:7000", "redis-1:7000"]',
                           "KVSTORE_REMOTE__KEY_SECRET": "a-secret-of-enough-length",
                           "KVSTORE_EVENTS__ENCODING": "map"},
                      overrides=["remote.min_quality=lossless", "remote.tenant_quota_bytes=2GiB"])
    assert cfg.remote.nodes == ["redis-0:7000", "redis-1:7000"]
    assert cfg.remote.min_quality is TierCodec.LOSSLESS and cfg.remote.tenant_quota_bytes == 2 * 1024**3
    assert cfg.events.encoding is EventEncoding.MAP
    assert not cfg.remote.enabled and not cfg.events.enabled


@pytest.mark.parametrize("setting, message", [
    ("remote.nodes=['nohost']", "host:port"),
    ("remote.min_quality=raw", "codec level"),
    ("remote.key_secret=short", "at least 16"),
    ("remote.timeout_ms=0", "greater than or equal"),
    ("events.block_hash=sha", "pattern"),
])
def test_bad_settings_are_rejected_with_their_name(setting, message):
    with pytest.raises(InvalidArgument, match=message) as e:
        load_config(env={}, overrides=[setting])
    assert setting.split("=")[0] in str(e.value)
