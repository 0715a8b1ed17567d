"""One client shared by several threads while its daemon restarts (the vLLM connector's
scheduler, worker and save threads share one): every call either answers correctly or raises
a ``KVStoreClientError``, never a bare ``AttributeError``/``ValueError`` from a mapping that
another thread is re-attaching, and the client keeps working on the new daemon.

The connector's ``SidecarLink`` turns any exception of a call into a miss (an engine request
never fails because of the client), and says so in the log."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from kvstore_client import KVStoreClient, Namespace
from kvstore_client.errors import KVStoreClientError

NS = Namespace(model="restart/shared-client", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=16,
               chunk_tokens=16)


def _kv(tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(NS.chunk_shape(tokens)).astype(np.float16)


def test_threads_sharing_a_client_across_daemon_restarts_see_answers_or_client_errors(daemon_factory):
    d = daemon_factory()
    prompts = [(list(range(1000 * p, 1000 * p + 96)), _kv(96, p)) for p in range(3)]
    unexpected: list[BaseException] = []
    wrong: list[str] = []
    answered = [0]
    stop = threading.Event()

    with KVStoreClient(d.addr, NS, timeout_s=5) as c:
        assert c.transport == "shm"

        def writer():
            while not stop.is_set():
                for toks, kv in prompts:
                    try:
                        c.store(toks, kv)
                    except KVStoreClientError:
                        time.sleep(0.002)
                    except BaseException as e:  # noqa: BLE001 - what this test looks for
                        unexpected.append(e)

        def reader(mode: str):
            while not stop.is_set():
                for toks, kv in prompts:
                    try:
                        if mode == "views":
                            with c.leased_views(c.keys(toks), verify_crc=True) as views:
                                for chunk in views.chunks:
                                    i = chunk.index
                                    want = np.ascontiguousarray(kv[:, :, 16 * i:16 * i + 16]).view(np.uint8)
                                    if not np.array_equal(np.asarray(chunk.data), want.reshape(-1)):
                                        wrong.append(f"views chunk {i}")
                            answered[0] += 1
                        else:
                            out = np.zeros_like(kv)
                            n = c.retrieve_into(toks, out)
                            if n and not np.array_equal(out[:, :, :n], kv[:, :, :n]):
                                wrong.append(f"retrieve_into {n} tokens")
                            answered[0] += 1
                    except KVStoreClientError:
                        time.sleep(0.002)
                    except BaseException as e:  # noqa: BLE001
                        unexpected.append(e)

        threads = [threading.Thread(target=writer)] + [
            threading.Thread(target=reader, args=(mode,)) for mode in ("views", "retrieve") * 3]
        for t in threads:
            t.start()
        try:
            for _ in range(5):
                time.sleep(0.3)
                d.kill()           # a crash: the arena's file goes with the next start
                d.start()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not unexpected, f"calls raised {unexpected[:3]!r} instead of answers or client errors"
        assert not wrong, wrong[:5]
        assert answered[0] > 0
        # after the last restart the same client serves the new daemon over shared memory
        toks, kv = prompts[0]
        c.store(toks, kv)
        out = np.zeros_like(kv)
        assert c.retrieve_into(toks, out) == 96 and np.array_equal(out, kv)
        assert c.transport == "shm"


def test_sidecar_link_turns_any_exception_of_a_call_into_a_miss_and_reconnects(daemon, caplog):
    from kvstore_client.engines.vllm.config import ConnectorConfig
    from kvstore_client.engines.vllm.link import SidecarLink

    link = SidecarLink(ConnectorConfig.from_extra_config({"kvstore.addr": daemon.addr, "kvstore.reconnect_s": 0.05}),
                       NS)
    try:
        first = link.client()
        assert first is not None

        def bug(c):
            raise AttributeError("'NoneType' object has no attribute 'view'")

        with caplog.at_level(logging.WARNING, logger="kvstore_client.engines.vllm.link"):
            assert link.call(bug, -1) == -1
        assert link.failures == 1
        assert "unexpected client error" in caplog.text
        # the client that raised was dropped; after reconnect_s a fresh one answers
        time.sleep(0.1)
        toks, kv = list(range(48)), _kv(48, 7)
        assert link.call(lambda c: c.store(toks, kv), 0) == 3
        assert link.call(lambda c: c.lookup(toks).matched_tokens, 0) == 48
        assert link.client() is not first
    finally:
        link.close()


def test_a_client_reaches_its_restarted_local_daemon_within_the_reconnect_backoff(daemon_factory):
    """A daemon down for several seconds (the client's calls failing fast meanwhile) is reached
    again soon after it serves: the client's channel to a same-host daemon retries every
    ``LOCAL_RECONNECT_BACKOFF_MS``, not on gRPC's default backoff (up to 120 s)."""
    from kvstore_client._steps import LOCAL_RECONNECT_BACKOFF_MS

    d = daemon_factory()
    toks, kv = list(range(96)), _kv(96, 7)
    with KVStoreClient(d.addr, NS, timeout_s=5) as c:
        c.store(toks, kv)
        d.kill()
        out = np.zeros_like(kv)
        down_until = time.monotonic() + 6   # default backoff: attempts at about 0, 1, 2.6, 5.2, 9.3 s
        failures = 0
        while time.monotonic() < down_until:
            try:
                c.retrieve_into(toks, out)      # an RPC (a lookup may answer from the index)
            except KVStoreClientError:
                failures += 1
            time.sleep(0.1)
        assert failures > 0
        d.start()
        served = time.monotonic()
        while True:
            try:
                c.retrieve_into(toks, out)
                break
            except KVStoreClientError:
                assert time.monotonic() - served < 1.0, "the client did not reach the restarted daemon"
                time.sleep(0.02)
        assert time.monotonic() - served < 1.0   # gRPC's default backoff: 1.6 s in one measured run
        assert LOCAL_RECONNECT_BACKOFF_MS <= 1000
        c.store(toks, kv)                   # the new daemon started empty
        assert c.retrieve_into(toks, out) == 96 and np.array_equal(out, kv)
