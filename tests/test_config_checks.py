"""Config validation and preflight without a daemon: every problem names its setting and source."""

from __future__ import annotations

import socket

import pytest

from kvstore.config import load_config, preflight
from kvstore.errors import InvalidArgument


def _err(**kw) -> str:
    with pytest.raises(InvalidArgument) as e:
        load_config(**kw)
    return str(e.value)


@pytest.mark.parametrize("addr", ["127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:99999", "nohost", "unix:"])
def test_listen_addresses_are_checked(addr):
    assert "server.listen" in _err(overrides=[f'server.listen=["{addr}"]'])


def test_metrics_port_range():
    assert "outside 1-65535" in _err(overrides=['metrics.listen="0.0.0.0:70000"'])


def test_unknown_keys_say_where_they_came_from(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[disk]\ncapcity = 1\n[nosuch]\nx = 1\n")
    msg = _err(path=f)
    assert f"disk.capcity: unknown setting (from config file {f})" in msg and "capacity_bytes" in msg
    assert "nosuch: unknown section" in msg
    assert "environment variable KVSTORE_DRAM__SIZE" in _err(env={"KVSTORE_DRAM__SIZE": "1"})
    assert "(from --set log.colour=1)" in _err(overrides=["log.colour=1"])


def test_a_bad_value_says_where_it_came_from():
    msg = _err(env={"KVSTORE_DRAM__CAPACITY_BYTES": "lots"})
    assert "dram.capacity_bytes" in msg and "KVSTORE_DRAM__CAPACITY_BYTES" in msg


def test_listen_as_a_string_explains_the_list_syntax():
    assert "TOML list" in _err(overrides=["server.listen=127.0.0.1:5000"])


def test_preflight_lists_every_problem_on_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        c = load_config(env={}, overrides=[f'server.listen=["127.0.0.1:{port}"]', 'metrics.listen=""',
                                           f'disk.path="{tmp_path}/file/data"',
                                           f'auth.tokens_file="{tmp_path}/missing.toml"'])
        with pytest.raises(InvalidArgument) as e:
            preflight(c)
    msg = str(e.value)
    assert "\n" not in msg
    assert "already in use" in msg and "disk.path" in msg and "auth.tokens_file" in msg


def test_preflight_creates_nothing(tmp_path):
    c = load_config(env={}, overrides=[f'disk.path="{tmp_path}/a/b/c"', 'metrics.listen=""',
                                       'server.listen=["unix:/tmp/kvstore-preflight.sock"]'])
    preflight(c)
    assert list(tmp_path.iterdir()) == []
