"""The [remote] and [events] config sections: defaults, environment overrides, rejections."""

from __future__ import annotations

import pytest

from kvstore.config import EventEncoding, TierCodec, load_config
from kvstore.errors import InvalidArgument


def test_remote_and_events_from_env_and_overrides():
    cfg = load_config(env={"KVSTORE_REMOTE__NODES": '["redis-0:7000", "redis-1:7000"]',
                           "KVSTORE_REMOTE__KEY_SECRET": "a-secret-of-enough-length",
                           "KVSTORE_EVENTS__ENCODING": "map"},
                      overrides=["remote.min_quality=lossless", "quotas.max_remote_bytes=2GiB"])
    assert cfg.remote.nodes == ["redis-0:7000", "redis-1:7000"]
    assert cfg.remote.min_quality is TierCodec.LOSSLESS and cfg.quotas.max_remote_bytes == 2 * 1024**3
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


def test_remote_enabled_joins_the_chain_last_or_where_listed():
    from kvstore.config import Config
    from kvstore.types import Medium

    on = {"enabled": True, "key_secret": "s" * 20}
    assert Config().chain.tiers == [Medium.DRAM, Medium.DISK]
    assert Config(remote=on).chain.tiers == [Medium.DRAM, Medium.DISK, Medium.REMOTE]
    assert Config(remote=on, chain={"tiers": ["dram", "remote", "disk"]}).chain.tiers == [
        Medium.DRAM, Medium.REMOTE, Medium.DISK]
    assert Config(remote=on, chain={"tiers": ["dram"]}).chain.tiers == [Medium.DRAM, Medium.REMOTE]


def test_remote_link_mode_is_write_through_and_disabled_remote_is_dropped(tmp_path):
    from kvstore.config import Config, WriteMode
    from kvstore.tiers import registry
    from kvstore.types import Medium

    e = registry.entry(Medium.REMOTE)
    assert e.write_mode(Config()) is WriteMode.WRITE_THROUGH
    assert not e.enabled(Config(chain={"tiers": ["dram", "remote"]}))


def test_address_map_and_fixed_level_are_checked():
    import pytest
    from pydantic import ValidationError

    from kvstore.config import RemoteConfig, TierCodec

    assert RemoteConfig(fixed_level="default").fixed_level is TierCodec.DEFAULT
    with pytest.raises(ValidationError):
        RemoteConfig(address_map={"nohost": "127.0.0.1:1"})
