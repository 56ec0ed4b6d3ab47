"""Instance side of the proxy's dynamic registration.

A vLLM instance tells the proxy "I exist, I am a prefill/decode node, reach me
at http_address" and repeats it every ``interval`` seconds as a heartbeat.
The proxy evicts instances whose heartbeats stop; :meth:`Announcer.stop`
sends a final ``leaving`` message so the proxy drops the instance at once.

Wire format: one ZMQ frame, msgpack-encoded :class:`Announcement`, sent from a
DEALER socket to the proxy's ROUTER socket.  ``version`` is
:data:`ANNOUNCE_PROTOCOL_VERSION`; the proxy ignores other versions loudly.

Version history:
  1 - first version. ``token`` (added later, optional: older proxies ignore
      it) signs an announcement with the deployment's shared secret, so a
      proxy that knows the secret refuses announcements from strangers.

This module must stay importable without vLLM and must not import the proxy
or the connector.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Literal, Optional

import msgspec

from vllm_ascend_pd import net

ANNOUNCE_PROTOCOL_VERSION = 1


@functools.lru_cache(maxsize=None)
def _logger() -> logging.Logger:
    """vLLM's logger inside a vLLM process, ``logging`` elsewhere.

    Resolved on first use: the proxy imports this module for the message
    type and must not pay for importing vLLM (and torch).
    """
    if os.environ.get("VLLM_ASCEND_PD_PLAIN_LOGGING", "") in ("1", "true", "yes"):
        return logging.getLogger(__name__)
    from vllm_ascend_pd.log import get_logger

    return get_logger(__name__)


class Announcement(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    role: Literal["prefill", "decode", "both"]
    http_address: str  # "host:port" of the OpenAI server
    kv_address: str = ""  # the connector's side channel, informational
    engine_id: str = ""
    model: str = ""
    version: int = ANNOUNCE_PROTOCOL_VERSION
    # Seconds between heartbeats; lets the proxy size its eviction TTL.
    interval: float = 0.0
    # Set on the last message of a clean shutdown.
    leaving: bool = False
    # vllm_ascend_pd.auth token over signed_fields(), fresh for every beat;
    # empty when the instance has no shared secret.
    token: str = ""


ANNOUNCE_AUTH_KIND = "announce"


def signed_fields(ann: Announcement) -> tuple:
    """What an announcement's token covers: everything but the token, in
    the types the receiver decodes (an ``int`` interval arrives a float)."""
    return (ann.role, ann.http_address, ann.kv_address, ann.engine_id, ann.model,
            int(ann.version), float(ann.interval), bool(ann.leaving))


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Announcement)


def encode_announcement(ann: Announcement) -> bytes:
    return _encoder.encode(ann)


def decode_announcement(data: bytes) -> Announcement:
    """Decode and validate; raises ``msgspec.ValidationError``/``DecodeError``."""
    try:
        return _decoder.decode(data)
    except RecursionError:
        # msgspec recurses to skip unknown fields: a few KB of nested
        # arrays raise RecursionError, which is no DecodeError.
        raise msgspec.DecodeError("announcement nested too deeply") from None


def _zmq_target(proxy_address: str) -> tuple[str, bool]:
    """The proxy's ZMQ endpoint, and whether it needs ZMQ's IPV6 option.

    A name stays in the endpoint: ZMQ resolves it again on every reconnect,
    so registration follows a proxy that moves (a Kubernetes Service). ZMQ
    resolves for IPv4 only without IPV6, and prefers IPv6 with it, so IPV6 is
    set when the system's resolver gives IPv6 first (see net.resolve).
    """
    addr = proxy_address.strip().removeprefix("tcp://")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"proxy_address must be 'host:port', got {proxy_address!r}")
    host = net.unbracket(host)  # the connector joins IPv6 unbracketed
    try:
        ipv6 = ":" in net.resolve(host, "proxy_ip")[0]
    except net.HostError as e:
        # Checked at start-up (config.check_proxy_ip): a DNS hiccup since.
        _logger().warning("%s; announcing over IPv4 meanwhile", e)
        ipv6 = False
    return f"tcp://{net.host_port(host, port)}", ipv6


class Announcer:
    """Heartbeats an :class:`Announcement` to the proxy from a daemon thread.

    ``start()`` and ``stop()`` never raise into the caller; failures (proxy
    down, bad address) are logged and retried on the next beat.
    """

    def __init__(self, proxy_address: str, announcement: Announcement,
                 interval: float = 3.0, secret: str = ""):
        """``secret``: the deployment's shared secret; when set, every beat
        carries a fresh token (nonce and timestamp), so it cannot be replayed."""
        from vllm_ascend_pd.auth import Authenticator

        self._auth = Authenticator(secret)
        self.proxy_address = proxy_address
        self.interval = max(float(interval), 0.05)
        if not announcement.interval:
            announcement = msgspec.structs.replace(announcement, interval=self.interval)
        self.announcement = announcement
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.sent = 0  # heartbeats handed to ZMQ, for tests and diagnostics

    def start(self) -> None:
        try:
            with self._lock:
                if self._thread is not None and self._thread.is_alive():
                    return
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="pd-announcer", daemon=True)
                self._thread.start()
        except Exception:
            _logger().exception("could not start the proxy announcer")

    def stop(self, timeout: float = 2.0) -> None:
        try:
            with self._lock:
                thread, self._thread = self._thread, None
            self._stop.set()
            if thread is not None:
                thread.join(timeout)
        except Exception:
            _logger().exception("error while stopping the proxy announcer")

    def _encode(self, ann: Announcement) -> bytes:
        if self._auth.enabled:
            ann = msgspec.structs.replace(
                ann, token=self._auth.sign(ANNOUNCE_AUTH_KIND, *signed_fields(ann)))
        return encode_announcement(ann)

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def _run(self) -> None:
        try:
            import zmq
        except Exception:
            _logger().exception("pyzmq is not importable; not announcing to the proxy")
            return
        ctx = sock = None
        warned = False
        try:
            endpoint, ipv6 = _zmq_target(self.proxy_address)
            bye_ann = msgspec.structs.replace(self.announcement, leaving=True)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 500)
            # Do not queue heartbeats while the proxy is unreachable: a
            # backlog would be replayed as stale beats on reconnect.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 4)
            if ipv6:
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(endpoint)
            _logger().info("announcing %s instance %s to proxy %s every %.1fs",
                        self.announcement.role, self.announcement.http_address,
                        endpoint, self.interval)
            while True:
                try:
                    sock.send(self._encode(self.announcement), zmq.NOBLOCK)
                    self.sent += 1
                    warned = False
                except zmq.Again:
                    if not warned:
                        _logger().warning("proxy %s not reachable yet; will keep trying",
                                       endpoint)
                        warned = True
                if self._stop.wait(self.interval):
                    break
            try:
                sock.send(self._encode(bye_ann), zmq.NOBLOCK)
            except zmq.Again:
                pass
        except Exception:
            _logger().exception("proxy announcer stopped on an error")
        finally:
            try:
                if sock is not None:
                    sock.close()
                if ctx is not None:
                    ctx.term()
            except Exception:
                _logger().debug("announcer socket cleanup failed", exc_info=True)
