"""ZMQ sockets and the ``Link`` adapters transports send through.

All sockets are non-blocking and owned by the worker's engine thread.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import zmq

from vllm_ascend_pd.net import host_port
from vllm_ascend_pd.protocol import MAX_CONTROL_BYTES
from vllm_ascend_pd.transport.base import TransferError, WouldBlock


class RouterLink:
    """Producer side: one consumer behind a ROUTER socket. The KV server
    routes that consumer's messages about this transfer to ``inbox``."""

    # A peer cannot make the producer buffer more than this per transfer.
    MAX_INBOX = 16

    def __init__(self, sock: zmq.Socket, identity: bytes):
        self.sock = sock
        self.identity = identity
        self.inbox: collections.deque = collections.deque()

    def deliver(self, frames) -> bool:
        if len(self.inbox) >= self.MAX_INBOX:
            return False
        self.inbox.append(frames)
        return True

    @property
    def pair_id(self) -> bytes:
        return self.identity

    def send(self, frames, *, copy: bool = True, track: bool = False):
        try:
            return self.sock.send_multipart(
                [self.identity, *frames], flags=zmq.NOBLOCK, copy=copy, track=track
            )
        except zmq.Again:
            raise WouldBlock from None
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise TransferError("consumer disconnected mid-transfer", "peer_lost") from None
            raise

    def try_recv(self):
        return self.inbox.popleft() if self.inbox else None


class DealerLink:
    """Consumer side: the DEALER socket connected to one producer rank.

    ZMQ reconnects silently when the producer goes away, so a monitor
    watches for the connection closing: a producer that dies mid-transfer
    fails the transfer at once instead of after ``transfer_timeout_s``."""

    def __init__(self, sock: zmq.Socket, endpoint: str):
        self.sock = sock
        self.endpoint = endpoint
        self.data_port = 0  # the producer's, from its HelloReply
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    @property
    def pair_id(self) -> bytes:
        return self.sock.getsockopt(zmq.ROUTING_ID)

    def send(self, frames, *, copy: bool = True, track: bool = False):
        try:
            return self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy, track=track)
        except zmq.Again:
            raise WouldBlock from None

    def try_recv(self):
        try:
            return self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass
        if not self._disconnected():
            return None
        try:  # frames that arrived before the close are still delivered first
            return self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise TransferError(
                f"producer {self.endpoint} closed the connection (it died or restarted)", "peer_lost"
            ) from None

    def disconnected_since_last_use(self) -> bool:
        """Between transfers: did the connection close (the events are
        consumed)? ZMQ reconnects by itself, but maybe to a new process."""
        return self._disconnected()

    def _disconnected(self) -> bool:
        seen = False
        while True:
            try:
                self._monitor.recv_multipart(flags=zmq.NOBLOCK)
                seen = True
            except zmq.Again:
                return seen

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self.sock.close(0)


# Messages ZMQ queues per peer before it stops reading that peer's
# connection (default 1000): with max_message_bytes this bounds what one
# connection can make the producer hold. Legitimate control messages are
# small and read every engine step, so they never queue this deep.
PRODUCER_RCVHWM = 64


def router_socket(
    ctx: zmq.Context, bind_host: str, port: int, role_hint: str,
    max_message_bytes: int = MAX_CONTROL_BYTES,
) -> zmq.Socket:
    """``bind_host``: an IP address (config.resolve_bind_host resolves a
    name): given a name, ZMQ would resolve it for IPv4 only."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    # Checked by ZMQ before anything is buffered or parsed: a larger frame
    # drops the peer's connection.
    sock.setsockopt(zmq.MAXMSGSIZE, min(max_message_bytes, MAX_CONTROL_BYTES))
    sock.setsockopt(zmq.RCVHWM, PRODUCER_RCVHWM)
    if ":" in bind_host:
        sock.setsockopt(zmq.IPV6, 1)  # ZMQ refuses IPv6 addresses without it
    try:
        sock.bind(tcp_endpoint(bind_host, port))
    except zmq.ZMQError as e:
        sock.close(0)
        raise RuntimeError(
            f"AscendSimpleConnector cannot listen on {host_port(bind_host, port)} ({role_hint}): "
            f"{e}. Another process (often a second vLLM instance on this host) uses "
            "it: give every instance its own kv_port, at least 128 apart and below the "
            "kernel's ephemeral port range, or free the port."
        ) from None
    return sock


# Chunks a consumer lets ZMQ queue before the producer must wait: bounds the
# consumer's memory (docs/benchmarks.md: Llama-3-8B 16k tokens, +178 MiB with
# ZMQ's default of 1000, +38 MiB with 16, same throughput).
CONSUMER_RCVHWM = 16


def dealer_socket(ctx: zmq.Context, endpoint: str, rcvhwm: int = CONSUMER_RCVHWM) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    # The producer is whoever kv_transfer_params name, so it is as untrusted
    # as a consumer: without a cap one frame could be any size.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
    # An explicit, unguessable routing id: both ends then know the pair's name
    # (group transports key their per-pair groups on it). A leading zero byte
    # is reserved by ZMQ.
    sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)
    return sock


def wait_ready(items: list[tuple[Any, int]], timeout_s: float) -> bool:
    """Block (without the GIL) until one of ``(socket, zmq.POLLIN|POLLOUT)``
    is ready or ``timeout_s`` passes; True if one is. Sockets may be ZMQ
    sockets or plain ones (a transport's data streams)."""
    poller = zmq.Poller()
    for sock, events in items:
        poller.register(sock, events)
    return bool(poller.poll(max(0.0, timeout_s) * 1e3))


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://{host_port(host, port)}"
