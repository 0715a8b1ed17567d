"""``kvstore``: the daemon's command line.

    kvstore serve [--config FILE] [--set section.field=value ...] [--data-dir DIR] [--listen ADDR ...]
    kvstore version

Configuration sources, later winning: defaults < --config file < KVSTORE_* environment <
--set < --data-dir/--listen. A bad configuration exits with status 2 and one clear message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from .. import __version__
from ..config import Config, load_config
from ..domain.errors import KVStoreError

log = logging.getLogger("kvstore")

EXIT_BAD_CONFIG = 2
EXIT_START_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache storage daemon for LLM inference.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", metavar="FILE", help="TOML config file")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one setting, e.g. --set dram.capacity_bytes=8GiB (repeatable)")
    s.add_argument("--data-dir", metavar="DIR", help="data directory (disk tier and namespace registry)")
    s.add_argument("--listen", action="append", metavar="ADDR",
                   help="host:port or unix:/path (repeatable; replaces server.listen)")
    sub.add_parser("version", help="print the version")
    return p


def build_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"disk.path={json.dumps(args.data_dir)}")
    if args.listen:
        overrides.append(f"server.listen={json.dumps(args.listen)}")
    return load_config(args.config, overrides=overrides)


def _setup_logging(config: Config) -> None:
    if config.log.json_lines:
        class _Json(logging.Formatter):
            def format(self, r):  # noqa: A003
                d = {"ts": r.created, "level": r.levelname, "logger": r.name, "msg": r.getMessage()}
                if r.exc_info:
                    d["exc"] = self.formatException(r.exc_info)
                return json.dumps(d)
        h = logging.StreamHandler()
        h.setFormatter(_Json())
        logging.basicConfig(level=config.log.level, handlers=[h])
    else:
        logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _serve(config: Config) -> None:
    from ..server.app import Daemon
    from ..store import Store

    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(None, Store.open, config)    # tiers built from config.chain
    try:
        daemon = Daemon(config, store)
    except BaseException:
        store.close()
        raise
    await daemon.start()
    log.info("kvstore %s listening on %s (data dir %s, auth %s)", __version__, ", ".join(config.server.listen),
             config.disk.path, "on" if config.auth.enabled else "off")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining requests for up to %.1fs", config.server.shutdown_grace_s)
    await daemon.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"kvstore {__version__}")
        return 0
    try:
        config = build_config(args)
    except KVStoreError as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _setup_logging(config)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        log.warning("uvloop is not installed; using the default asyncio loop")
    try:
        asyncio.run(_serve(config))
    except KVStoreError as e:
        print(f"kvstore: cannot start: {e}", file=sys.stderr)
        return EXIT_START_FAILED if e.code != "INVALID_ARGUMENT" else EXIT_BAD_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
