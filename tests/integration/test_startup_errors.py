"""Every misconfiguration of issue 9 ends the daemon with one line on stderr, exit status 2,
no traceback and no shared-memory file left behind. Real daemon processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import free_port

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "dram.capacity_bytes=32MiB", "--set", "server.shutdown_grace_s=0"]


#: When each daemon of these tests started, by pid: a file of its pid older than that is
#: another, earlier process's (pids are reused), not this daemon's leak.
_STARTED: dict[int, float] = {}


def serve(*args, env_extra=None, cwd=None):
    started = time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(env_extra or {})
    p = subprocess.Popen([sys.executable, "-m", "kvstore.cli.daemon", "serve", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    _STARTED[p.pid] = started
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return p.pid, p.returncode, out, err


def _assert_clean_exit(pid, rc, err, must_say, *, only_line=True):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    ours = [ln for ln in lines if ln.startswith("kvstore:")]
    assert len(ours) == 1 and must_say in ours[0], err
    if only_line:
        assert lines == ours, err
    leaked = sorted(f for f in Path("/dev/shm").glob(f"kvstore-{pid}.*")
                    if f.lstat().st_mtime >= _STARTED.get(pid, 0.0) - 1.0)
    assert not leaked, leaked


def _base(tmp_path):
    return ["--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}",
            "--set", 'metrics.listen=""', *SMALL]


def test_port_out_of_range(tmp_path):
    pid, rc, _, err = serve("--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:99999", *SMALL)
    _assert_clean_exit(pid, rc, err, "port 99999")
    assert not (tmp_path / "d").exists()


def test_metrics_port_out_of_range(tmp_path):
    pid, rc, _, err = serve(*_base(tmp_path), "--set", 'metrics.listen="127.0.0.1:70000"')
    _assert_clean_exit(pid, rc, err, "metrics.listen")


def test_metrics_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        pid, rc, _, err = serve(*_base(tmp_path), "--set", f'metrics.listen="127.0.0.1:{port}"')
    _assert_clean_exit(pid, rc, err, "already in use")


def test_listen_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        pid, rc, _, err = serve("--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{port}",
                                "--set", 'metrics.listen=""', *SMALL)
    _assert_clean_exit(pid, rc, err, "already in use")


def test_data_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    pid, rc, _, err = serve(*_base(tmp_path), "--data-dir", str(f))
    _assert_clean_exit(pid, rc, err, "not a directory")


def test_data_dir_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    pid, rc, _, err = serve(*_base(tmp_path), "--data-dir", str(f / "data"))
    _assert_clean_exit(pid, rc, err, "disk.path")


def test_data_dir_not_writable(tmp_path):
    pid, rc, _, err = serve(*_base(tmp_path), "--data-dir", "/proc/kvstore-data")
    _assert_clean_exit(pid, rc, err, "not writable")


def test_missing_tokens_file(tmp_path):
    pid, rc, _, err = serve(*_base(tmp_path), "--set", f'auth.tokens_file="{tmp_path}/nope.toml"')
    _assert_clean_exit(pid, rc, err, "does not exist")


def test_unknown_key_names_its_source(tmp_path):
    pid, rc, _, err = serve(*_base(tmp_path), env_extra={"KVSTORE_DISK__CAPACITY": "1GiB"})
    _assert_clean_exit(pid, rc, err, "environment variable KVSTORE_DISK__CAPACITY")
    cfg = tmp_path / "k.toml"
    cfg.write_text("[dram]\ncapacity = 5\n")
    pid, rc, _, err = serve(*_base(tmp_path), "--config", str(cfg))
    _assert_clean_exit(pid, rc, err, f"config file {cfg}")
    pid, rc, _, err = serve(*_base(tmp_path), "--set", "log.colour=1")
    _assert_clean_exit(pid, rc, err, "--set log.colour=1")


def test_listen_needs_a_list_says_how(tmp_path):
    pid, rc, _, err = serve("--data-dir", str(tmp_path / "d"), *SMALL, "--set", "server.listen=127.0.0.1:5000")
    _assert_clean_exit(pid, rc, err, "TOML list")


@pytest.mark.skipif(Path("/data").exists(), reason="needs /data to be absent to see it is not created")
def test_deploy_config_validates_before_creating_data(tmp_path):
    pid, rc, _, err = serve("--config", str(REPO / "deploy" / "kvstore.toml"), *SMALL,
                            "--set", 'dram.shm_name="auto"')
    _assert_clean_exit(pid, rc, err, "auth.tokens_file")
    assert not Path("/data").exists()


def test_data_dir_in_use_cleans_shared_memory(daemon_factory, tmp_path):
    d = daemon_factory()
    pid, rc, _, err = serve("--data-dir", str(d.data_dir), "--listen", f"127.0.0.1:{free_port()}",
                            "--set", 'metrics.listen=""', *SMALL)
    _assert_clean_exit(pid, rc, err, "in use by another kvstore daemon", only_line=False)


def test_remote_listener_without_auth_cleans_shared_memory(tmp_path):
    pid, rc, _, err = serve("--data-dir", str(tmp_path / "d"), "--listen", f"0.0.0.0:{free_port()}",
                            "--set", 'metrics.listen=""', *SMALL)
    _assert_clean_exit(pid, rc, err, "without authentication", only_line=False)


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGINT", "SIGQUIT"])
def test_stop_signals_remove_shared_memory(daemon_factory, sig):
    import signal
    d = daemon_factory(settings=("dram.capacity_bytes=32MiB",))
    pid = d.proc.pid
    assert sorted(Path("/dev/shm").glob(f"kvstore-{pid}.*")), "expected a shared arena to check its removal"
    assert d.kill(getattr(signal, sig)) == 0
    assert not sorted(Path("/dev/shm").glob(f"kvstore-{pid}.*"))
    assert "kvstore 0." in d.log() and "data dir" in d.log() and f"kill -TERM {pid}" in d.log()   # the banner
