"""Raw TCP data streams for the ``tcp`` transport, driven without blocking.

Each consumer connection (one ZMQ ``Link``) gets one data socket to the
producer rank's data port. The consumer opens it and names the pair with a
``DataHello`` carrying the link's routing id, which only the two ends know
(signed, when the deployment has a shared secret, so a stranger can neither
name a stream nor replay a name); the producer files the socket under that
id. Blocks then move as raw bytes:
``sendmsg`` straight from the producer's cache blocks and ``recvmsg_into``
straight into the consumer's, so a contiguous block is never copied in user
space. Every transfer starts with a length-prefixed ``DataHeader`` that the
consumer checks before it writes a byte into its cache.

All calls are non-blocking generators in the style of ``transport.base``:
they yield False when the socket would block.
"""

from __future__ import annotations

import collections
import errno
import socket
import struct
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import zmq

from vllm_ascend_pd import net
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.auth import Authenticator, AuthError
from vllm_ascend_pd.log import get_logger
from vllm_ascend_pd.transport.base import TransferError

logger = get_logger(__name__)

_LEN = struct.Struct("!I")
# A preamble or header never needs more; anything longer is not our peer.
MAX_PREAMBLE = 1024
# Buffers per sendmsg/recvmsg_into call (Linux IOV_MAX is 1024).
IOV_BATCH = 128
# Unnamed connections the producer holds; past this the oldest is closed.
MAX_PENDING = 64
PREAMBLE_TIMEOUT_S = 5.0
# Named connections a producer keeps; the least recently used is closed first.
MAX_PAIRS = 256
# How often the producer closes named connections whose consumer went away.
REAP_EVERY_S = 1.0
# Marks a point in a view stream where everything before it must be sent
# (or received) before the stream continues: staged views reuse a buffer.
FLUSH = object()
_END = object()
# Larger than loopback's default so one engine step moves more per call.
SOCKET_BUFFER = 8 << 20


def framed(msg: wire.Message) -> bytes:
    body = wire.encode(msg)
    return _LEN.pack(len(body)) + body


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass  # capped by net.core.{w,r}mem_max; the default still works


class FrameReader:
    """Accumulates one length-prefixed message from a non-blocking socket."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def poll(self, sock: socket.socket) -> wire.Message | None:
        """The message once complete; raises TransferError on EOF or garbage."""
        while True:
            need = _LEN.size if len(self._buf) < _LEN.size else _LEN.size + _LEN.unpack_from(self._buf)[0]
            if need > _LEN.size + MAX_PREAMBLE:
                raise TransferError(f"data stream frame of {need} bytes is too long", "protocol")
            if len(self._buf) == need and need > _LEN.size:
                body, self._buf = bytes(self._buf[_LEN.size :]), bytearray()
                try:
                    return wire.decode(body)
                except wire.ProtocolError as e:
                    raise TransferError(f"bad data stream frame: {e}", "protocol") from None
            try:
                got = sock.recv(need - len(self._buf))
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                raise TransferError(f"data connection failed: {e}", "peer_lost") from None
            if not got:
                raise TransferError("the peer closed the connection (data stream)", "peer_lost")
            self._buf += got


class _Batch:
    """The next buffers to hand to one ``sendmsg``/``recvmsg_into`` call:
    at most ``IOV_BATCH`` of them and ``max_bytes`` in all (so one call, and
    one pump step, moves at most a chunk)."""

    def __init__(self, views: Iterator[Any], max_bytes: int):
        self.views = views
        self.max_bytes = max(1, max_bytes)
        self.bufs: collections.deque[memoryview] = collections.deque()
        self.queued = 0
        self._held: memoryview | None = None  # the rest of a view split at max_bytes
        self._stop: object | None = None  # FLUSH or _END, once reached

    def fill(self) -> None:
        if self._stop is FLUSH and not self.bufs:
            self._stop = None  # everything before the flush point has moved
        if self._stop is not None:
            return
        while len(self.bufs) < IOV_BATCH and self.queued < self.max_bytes:
            v = self._held if self._held is not None else next(self.views, _END)
            self._held = None
            if v is _END or v is FLUSH:
                self._stop = v
                return
            room = self.max_bytes - self.queued
            if len(v) > room:
                v, self._held = v[:room], v[room:]
            if len(v):
                self.bufs.append(v)
                self.queued += len(v)

    @property
    def done(self) -> bool:
        return self._stop is _END and not self.bufs

    def consume(self, n: int) -> None:
        self.queued -= n
        while n:
            head = self.bufs[0]
            if n >= len(head):
                n -= len(head)
                self.bufs.popleft()
            else:
                self.bufs[0] = head[n:]
                n = 0


def _move(sock, views, timeout_s: float, max_bytes: int, call, idle_error, on_idle=None):
    batch = _Batch(views, max_bytes)
    total = 0
    deadline = time.monotonic() + timeout_s
    while True:
        batch.fill()
        if batch.done:
            return total
        if not batch.bufs:
            continue  # at a flush point: the stream continues with the next view
        try:
            n = call(batch.bufs)
        except (BlockingIOError, InterruptedError):
            if on_idle is not None:
                on_idle()
            if time.monotonic() >= deadline:
                raise idle_error() from None
            yield False
            continue
        except OSError as e:
            if on_idle is not None:
                on_idle()  # a producer that failed says why on the control link
            raise TransferError(
                f"the peer closed the connection (data stream: {e})", "peer_lost"
            ) from None
        if n == 0:
            if on_idle is not None:
                on_idle()
            raise TransferError("the peer closed the connection mid-transfer (data stream)", "peer_lost")
        total += n
        batch.consume(n)
        deadline = time.monotonic() + timeout_s
        yield True


def send_views(
    sock: socket.socket, views: Iterator[Any], timeout_s: float, max_bytes: int
) -> Generator[bool, None, int]:
    """Send every view in order (``FLUSH`` items: finish what came before
    first); returns the bytes sent."""

    def stalled() -> TransferError:
        return TransferError(f"the consumer stopped reading for {timeout_s:.1f}s", "peer_stalled")

    return (yield from _move(sock, views, timeout_s, max_bytes, sock.sendmsg, stalled))


def recv_views(
    sock: socket.socket, views: Iterator[Any], timeout_s: float, max_bytes: int, on_idle=None
) -> Generator[bool, None, int]:
    """Fill every view in order; returns the bytes received. ``on_idle`` runs
    whenever the socket has nothing (it may raise to end the transfer)."""

    def silent() -> TransferError:
        return TransferError(
            f"no KV data from the producer for {timeout_s:.1f}s (dead, overloaded or "
            "firewalled data port?)",
            "timeout",
        )

    def recv(bufs) -> int:
        return sock.recvmsg_into(bufs)[0]

    return (yield from _move(sock, views, timeout_s, max_bytes, recv, silent, on_idle))


def connect(
    host: str, port: int, pair_id: bytes, timeout_s: float, on_socket=None, token: str = ""
) -> Generator[bool, None, socket.socket]:
    """Consumer: open a data connection and name its pair (``token``: the
    name's signature). ``on_socket`` sees the socket as soon as it exists
    (to wait on it while it connects)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TransferError(f"cannot resolve producer data address {host}: {e}", "peer_lost") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _tune(sock)
        if on_socket is not None:
            on_socket(sock)
        deadline = time.monotonic() + timeout_s
        while True:
            err = sock.connect_ex(addr)
            if err in (0, errno.EISCONN):
                break
            if err not in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR):
                raise TransferError(
                    f"cannot connect to the producer's data port {host}:{port}: "
                    f"{errno.errorcode.get(err, err)}; check that the producer runs the same "
                    "transport and that the port is reachable",
                    "peer_lost",
                )
            if time.monotonic() >= deadline:
                raise TransferError(
                    f"cannot connect to the producer's data port {host}:{port} within "
                    f"{timeout_s:.1f}s: is it reachable from here (firewall)?",
                    "timeout",
                )
            yield False
        hello = memoryview(framed(wire.DataHello(pair_id, token)))
        yield from send_views(sock, iter([hello]), timeout_s, len(hello))
    except BaseException:
        sock.close()
        raise
    return sock


class _Pending:
    __slots__ = ("sock", "reader", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.reader = FrameReader()
        self.deadline = deadline


class DataListener:
    """Producer: accepts data connections and files them by pair id.

    Bound at start-up so a taken port fails the instance at once. Peers are
    untrusted: unnamed connections are bounded in number and time, and a
    bad or (with a secret) unsigned preamble closes the connection without
    a reply. ``on_refused(reason, detail)`` hears of each."""

    def __init__(
        self, bind_host: str, port: int, auth: Authenticator | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        sock = socket.socket(net.family_of(bind_host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind_host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise RuntimeError(
                f"AscendSimpleConnector cannot listen on {net.host_port(bind_host, port)} for tcp KV data: "
                f"{e}. This port is kv_port + 64 + rank; give every instance on a host its "
                "own kv_port, at least 128 apart and below the kernel's ephemeral port "
                "range, or free the port."
            ) from None
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._pending: list[_Pending] = []
        self._pairs: collections.OrderedDict[bytes, socket.socket] = collections.OrderedDict()
        self.refused = 0
        self._auth = auth or Authenticator("")
        self._on_refused = on_refused
        self._reaped_at = time.monotonic()

    def poll(self) -> None:
        """Accept and name waiting connections; never raises for a peer's
        fault. Those already waiting are named first, so a burst of new
        connections cannot push out one whose preamble has arrived."""
        now = time.monotonic()
        self._name_pending(now)
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. EMFILE: leave the rest queued
                logger.warning("tcp KV data: accept failed: %s", e)
                break
            if len(self._pending) >= MAX_PENDING:
                # The oldest, not the newest: a consumer says who it is as
                # soon as it connects, so one that has not after all the
                # connections since is the likelier squatter, and refusing
                # newcomers let 64 silent connections shut out every new
                # consumer, with or without a secret.
                self._refuse(self._pending.pop(0).sock, "overflow",
                             f"more than {MAX_PENDING} unnamed connections")
            _tune(sock)
            self._pending.append(_Pending(sock, now + PREAMBLE_TIMEOUT_S))
        self._name_pending(now)
        if now - self._reaped_at >= REAP_EVERY_S:
            self._reaped_at = now
            self._reap()

    def _name_pending(self, now: float) -> None:
        keep = []
        for p in self._pending:
            try:
                msg = p.reader.poll(p.sock)
            except TransferError as e:
                self._refuse(p.sock, "malformed", str(e))
                continue
            if msg is None:
                if now < p.deadline:
                    keep.append(p)
                else:
                    self._refuse(p.sock, "timeout", "no preamble in time")
            elif isinstance(msg, wire.DataHello) and len(msg.pair_id) >= 8:
                try:
                    self._auth.verify("data_hello", msg.auth, msg.pair_id)
                except AuthError as e:
                    self._refuse(p.sock, "auth", str(e))
                    continue
                self._file(msg.pair_id, p.sock)
            else:
                self._refuse(p.sock, "malformed", f"unexpected {type(msg).__name__}")
        self._pending = keep

    def _reap(self) -> None:
        # A consumer never writes after its preamble: EOF means it is gone,
        # and bytes mean it is not a well-behaved peer.
        for pair_id, sock in list(self._pairs.items()):
            try:
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue  # nothing to read: still there
            except OSError:
                pass
            del self._pairs[pair_id]
            sock.close()

    def _refuse(self, sock: socket.socket, reason: str, detail: str) -> None:
        self.refused += 1
        logger.debug("tcp KV data: closed a connection (%s): %s", reason, detail)
        sock.close()
        if self._on_refused is not None:
            self._on_refused(reason, detail)

    def _file(self, pair_id: bytes, sock: socket.socket) -> None:
        old = self._pairs.pop(pair_id, None)
        if old is not None:
            old.close()  # the same pair reconnected: the old stream is void
        self._pairs[pair_id] = sock
        while len(self._pairs) > MAX_PAIRS:
            self._pairs.popitem(last=False)[1].close()

    def poll_items(self) -> list[tuple[socket.socket, int]]:
        """What a producer waiting for a stream to be named waits on."""
        return [(self._sock, zmq.POLLIN), *((p.sock, zmq.POLLIN) for p in self._pending)]

    def take(self, pair_id: bytes) -> socket.socket | None:
        """The pair's socket, lent out until ``give_back`` (None: not yet here)."""
        return self._pairs.pop(pair_id, None)

    def give_back(self, pair_id: bytes, sock: socket.socket) -> None:
        if pair_id in self._pairs:
            sock.close()  # superseded by a reconnect while lent out
        else:
            self._pairs[pair_id] = sock

    def close(self) -> None:
        for p in self._pending:
            p.sock.close()
        for s in self._pairs.values():
            s.close()
        self._pending.clear()
        self._pairs.clear()
        self._sock.close()
