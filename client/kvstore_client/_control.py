"""The client end of the daemon's same-host control socket (``AttachResponse.control_socket``).

``ControlChannel`` sends LocalData's hot calls (ReserveWrite, CommitWrite, LeaseRead,
Release) as length-prefixed frames on a unix socket and matches the answers by call id
(the daemon's ``kvstore.server.control`` has the frame format). ``ControlStub`` looks like a
sync gRPC stub of one method: ``stub(request, timeout=...)`` and ``stub.future(...)``; errors
are ``ControlRpcError``, a ``grpc.RpcError`` with ``code()`` and ``details()``, so callers
handle both transports alike. When the socket is gone (the daemon stopped) the stub sends
its calls over gRPC instead: a re-attach (new arena, new ticket) opens a new channel.

Threading: calls may be made from any thread; one reader thread per channel completes the
futures, and also fails those past their deadline (DEADLINE_EXCEEDED), or all of them with
UNAVAILABLE when the connection ends. ``_lock`` guards the table of calls in flight and the
closed flag (a leaf lock, never held while sending); ``_send_lock`` serialises frames on the
socket (the reader thread never takes it, so answers are read while a send waits).
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import struct
import threading
import time
from concurrent.futures import Future

import grpc

from kvstore_wire._proto.kvstore.v1 import local_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIB")
HELLO = 0
#: RPC name (``_steps.RPCS``) -> (method code on the socket, response class).
METHODS = {
    "reserve": (1, local_pb2.ReserveWriteResponse),
    "commit": (2, local_pb2.CommitWriteResponse),
    "lease_read": (3, local_pb2.LeaseReadResponse),
    "release": (4, local_pb2.ReleaseResponse),
}
#: Seconds to connect and have the HELLO answered.
CONNECT_TIMEOUT_S = 2.0
#: How often the reader thread looks for calls past their deadline.
DEADLINE_POLL_S = 0.25
_STATUS = {c.value[0]: c for c in grpc.StatusCode}


class ControlRpcError(grpc.RpcError):
    """A failed control-socket call, shaped like a gRPC call error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return ()

    def initial_metadata(self):
        return ()


class ControlChannel:
    """One connection to a daemon's control socket, authenticated by an Attach's ticket."""

    def __init__(self, path: str, ticket: bytes, nonce: bytes = b"") -> None:
        self.path = path
        #: The arena nonce of the Attach that gave the ticket (which daemon this is).
        self.nonce = nonce
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
            sock.sendall(HEADER.pack(len(ticket) + 5, 0, HELLO) + ticket)
            _, code, body = _read_frame(sock)
        except BaseException:
            sock.close()
            raise
        if code != 0:
            sock.close()
            raise ControlRpcError(_STATUS.get(code, grpc.StatusCode.UNKNOWN), body.decode(errors="replace"))
        sock.settimeout(None)    # blocking sends; the reader waits in select() to poll deadlines
        self._sock = sock
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()   # one frame at a time on the socket (never taken by the reader)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Future, type, float | None]] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="kvstore-control", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._closed

    def call(self, rpc: str, request, timeout_s: float | None) -> Future:
        code, response_cls = METHODS[rpc]
        body = request.SerializeToString()
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                raise ControlRpcError(grpc.StatusCode.UNAVAILABLE, "the control socket is closed")
            call_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            self._pending[call_id] = (fut, response_cls, deadline)
        frame = HEADER.pack(len(body) + 5, call_id, code) + body
        if threading.current_thread() is self._reader:
            # A done-callback making a call: the reader must never block in a send (the
            # daemon may be waiting for it to read answers first).
            threading.Thread(target=self._send, args=(call_id, frame), daemon=True).start()
            return fut
        if not self._send(call_id, frame):
            raise ControlRpcError(grpc.StatusCode.UNAVAILABLE, "the control socket failed")
        return fut

    def _send(self, call_id: int, frame: bytes) -> bool:
        """Sends one frame; on failure the channel closes and the call is no longer pending."""
        with self._send_lock:
            try:
                self._sock.sendall(frame)
                return True
            except OSError as e:
                why = f"sending on the control socket failed: {e}"
        with self._lock:
            self._pending.pop(call_id, None)
            self._fail_all_locked(why)
        return False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._fail_all_locked("the client closed the control socket")
        self._reader.join(timeout=2 * DEADLINE_POLL_S + 1)

    # ------------------------------------------------------------------ reader thread
    def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while not self._closed:
                try:
                    if not select.select([self._sock], [], [], DEADLINE_POLL_S)[0]:
                        self._expire()
                        continue
                    data = self._sock.recv(1 << 20)
                except (OSError, ValueError) as e:    # ValueError: closed by close() meanwhile
                    self._end(f"the control socket failed: {e}")
                    return
                if not data:
                    self._end("the daemon closed the control socket (it stopped or restarted)")
                    return
                buf += data
                while len(buf) >= HEADER.size:
                    length, call_id, code = HEADER.unpack_from(buf)
                    if len(buf) < 4 + length:
                        break
                    body = bytes(buf[HEADER.size:4 + length])
                    del buf[:4 + length]
                    self._complete(call_id, code, body)
                self._expire()
        except BaseException as e:  # noqa: BLE001 - never leave a caller waiting
            self._end(f"the control socket reader failed: {type(e).__name__}: {e}")

    def _complete(self, call_id: int, code: int, body: bytes) -> None:
        with self._lock:
            entry = self._pending.pop(call_id, None)
        if entry is None:
            if call_id == 0 and code != 0:   # the daemon ended the connection with a reason
                log.info("the daemon's control socket refused this client: %s", body.decode(errors="replace"))
            return
        fut, response_cls, _ = entry
        if code == 0:
            try:
                fut.set_result(response_cls.FromString(body))
            except Exception as e:  # noqa: BLE001 - a malformed answer fails that call only
                fut.set_exception(ControlRpcError(grpc.StatusCode.INTERNAL, f"malformed answer: {e}"))
        else:
            fut.set_exception(ControlRpcError(_STATUS.get(code, grpc.StatusCode.UNKNOWN),
                                              body.decode(errors="replace")))

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [cid for cid, (_, _, d) in self._pending.items() if d is not None and d <= now]
            entries = [self._pending.pop(cid) for cid in late]
        for fut, _, _ in entries:
            fut.set_exception(ControlRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _end(self, why: str) -> None:
        with self._lock:
            self._fail_all_locked(why)

    def _fail_all_locked(self, why: str) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        entries, self._pending = list(self._pending.values()), {}
        for fut, _, _ in entries:
            if not fut.done():
                fut.set_exception(ControlRpcError(grpc.StatusCode.UNAVAILABLE, why))


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    head = _recv_exactly(sock, HEADER.size)
    length, call_id, code = HEADER.unpack(head)
    return call_id, code, _recv_exactly(sock, length - 5) if length > 5 else b""


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError("the daemon closed the control socket")
        out += got
    return bytes(out)


class ControlStub:
    """One LocalData method: over the core's control channel while it is open, else over
    ``fallback`` (the gRPC stub). Same call shapes as a sync gRPC stub."""

    def __init__(self, core, rpc: str, fallback) -> None:
        self._core = core
        self._rpc = rpc
        self._fallback = fallback

    def _channel(self) -> ControlChannel | None:
        ch = getattr(self._core, "control", None)
        return ch if ch is not None and ch.alive else None

    def _send(self, request, timeout) -> Future | None:
        """The call on the control channel, or None when there is none (or it closed before
        the request was sent: then nothing reached the daemon and gRPC is used)."""
        ch = self._channel()
        if ch is None:
            return None
        try:
            return ch.call(self._rpc, request, timeout)
        except ControlRpcError:
            return None

    def __call__(self, request, metadata=None, timeout=None):
        fut = self._send(request, timeout)
        if fut is None:
            return self._fallback(request, metadata=metadata, timeout=timeout)
        return fut.result()      # the reader thread fails it at its deadline

    def future(self, request, metadata=None, timeout=None):
        fut = self._send(request, timeout)
        if fut is None:
            return self._fallback.future(request, metadata=metadata, timeout=timeout)
        return fut


def with_control(core, stubs: dict) -> dict:
    """``stubs`` (sync gRPC stubs by RPC name) with the control-socket methods routed through
    ``core.control`` while it is open."""
    return {name: (ControlStub(core, name, stub) if name in METHODS and not isinstance(stub, ControlStub) else stub)
            for name, stub in stubs.items()}


def open_control(core, attach_response) -> None:
    """Opens the control channel an Attach offered (``core.control``), closing any earlier one;
    leaves None (every call over gRPC) when there is none or it cannot be reached."""
    old = getattr(core, "control", None)
    path, ticket = attach_response.control_socket, attach_response.control_ticket
    if old is not None and old.alive and old.nonce == attach_response.nonce and old.path == path:
        return     # a second attach to the same daemon (threads of a shared client): keep it
    core.control = None
    if old is not None:
        old.close()
    if not path or not ticket or core.arena is None:
        return
    try:
        core.control = ControlChannel(path, bytes(ticket), attach_response.nonce)
    except (OSError, grpc.RpcError) as e:
        log.info("the daemon's control socket %s is not usable (%s); same-host calls go over gRPC", path, e)


def close_control(core) -> None:
    ch = getattr(core, "control", None)
    core.control = None
    if ch is not None:
        ch.close()
