"""The proxy's one configuration object: fields, command-line flags, validation.

Every tunable of the proxy lives here, with its default and its flag, so there
is one place to read what can be set.  ``ProxyConfig.validate()`` is called
once at start-up and raises :class:`ConfigError` with a message that says which
flag to set.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from vllm_ascend_pd.net import host_port

POLICIES = ("round_robin", "least_requests", "least_tokens", "prefix_affinity")
ADMIN_TOKEN_ENV = "P2P_PROXY_ADMIN_TOKEN"


class ConfigError(ValueError):
    """Raised when the proxy configuration is unusable."""


_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def parse_address(value: str, *, what: str = "address") -> tuple[str, int]:
    """Parse ``host:port`` (also ``http://host:port`` and ``[v6]:port``).

    Returns ``(host, port)``; raises :class:`ConfigError` otherwise.
    """
    text = value.strip()
    for scheme in ("http://", "tcp://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    if not text or "/" in text:
        raise ConfigError(f"invalid {what} {value!r}: expected host:port")
    if text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"invalid {what} {value!r}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"invalid {what} {value!r}: {exc}") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(f"invalid {what} {value!r}: expected host:port")
        # The host goes into every URL of that instance: anything but a
        # hostname or IPv4 address (userinfo "u@h", "\\", "?", spaces) made
        # each request to it, and the health checker, fail with ValueError.
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"invalid {what} {value!r}: the host must be a hostname "
                              "(letters, digits, '-', '_', '.') or an IP address")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"invalid {what} {value!r}: port must be an integer") from None
    if not 0 < port < 65536:
        raise ConfigError(f"invalid {what} {value!r}: port must be in 1..65535")
    return host, port


def normalize_address(value: str, *, what: str = "address") -> str:
    """Canonical ``host:port`` form used as the registry key."""
    return host_port(*parse_address(value, what=what))


@dataclass
class ProxyConfig:
    # Listening socket of the HTTP front end.
    host: str = "127.0.0.1"
    port: int = 8000
    # Static instances, "host:port" each.
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    # kv_both instances: each serves as P for some requests and D for others.
    both: list[str] = field(default_factory=list)
    # Served model name; when set, requests naming another model get 404.
    model: Optional[str] = None
    policy: str = "round_robin"
    # prefix_affinity: how much of the prompt (raw JSON bytes) picks the
    # instance, and the load bound (x the fair share) past which it spills.
    affinity_prefix_bytes: int = 512
    affinity_load_factor: float = 1.25
    # Dynamic registration (ZMQ ROUTER); None disables it.
    register_host: str = "127.0.0.1"
    register_port: Optional[int] = None
    # Registered instances missing heartbeats for this long are evicted.
    # None: three times the interval the instance announces (9 s if unknown).
    heartbeat_ttl: Optional[float] = None
    # Active health checks: GET /health on every instance; 0 disables them.
    health_interval: float = 3.0
    health_timeout: float = 2.0
    health_failures: int = 2  # consecutive failed checks before "unhealthy"
    # A node whose request failed is avoided for this long (or until it
    # passes a health check).
    suspect_cooldown: float = 5.0
    # Upstream timeouts (seconds).  There is deliberately no total cap.
    connect_timeout: float = 10.0
    first_byte_timeout: float = 300.0
    event_gap_timeout: float = 120.0
    # A client that stops reading: one write to it may wait this long for
    # room in its connection's buffers before the request is cut.
    client_write_timeout: float = 60.0
    # Non-streaming decode returns its whole answer at the end; 0 = no cap.
    nonstream_timeout: float = 0.0
    prefill_attempts: int = 3
    decode_attempts: int = 3
    # Admission control.
    max_inflight: int = 4096
    retry_after: int = 1
    max_body_bytes: int = 32 * 1024 * 1024
    # The whole request body must arrive within this (408 otherwise): a
    # client trickling its body holds one of --max-inflight's slots.
    body_timeout: float = 60.0
    drain_timeout: float = 30.0
    # Admin API (POST/DELETE /admin/instances); disabled when None.
    admin_token: Optional[str] = None
    # Per-backend aiohttp connector size.
    backend_connections: int = 4096
    # Idle pooled connections to an instance are closed after this long. It
    # must stay below the instances' own keep-alive (vLLM: 5 s,
    # VLLM_HTTP_TIMEOUT_KEEP_ALIVE), or a request can go out on a connection
    # the instance is closing and fail with "connection reset".
    backend_keepalive: float = 4.0
    release_timeout: float = 2.0
    # Environment variable holding the instances' shared secret (their
    # shared_secret_env), needed to release abandoned transfers; None: none.
    kv_secret_env: Optional[str] = None
    access_log: bool = False
    log_level: str = "INFO"
    uvloop: bool = True
    # Serving processes sharing the listening socket (proxy/supervisor.py).
    # 1: one process, no supervisor.
    workers: int = 1

    def kv_secret(self) -> str:
        """The instances' shared secret ("" without --kv-secret-env)."""
        return os.environ.get(self.kv_secret_env, "") if self.kv_secret_env else ""

    def validate(self) -> "ProxyConfig":
        """Check every field; normalise addresses.  Returns self."""
        errors: list[str] = []

        def check(cond: bool, msg: str) -> None:
            if not cond:
                errors.append(msg)

        for role in ("prefill", "decode", "both"):
            normed = []
            for addr in getattr(self, role):
                try:
                    normed.append(normalize_address(addr, what=f"--{role} address"))
                except ConfigError as exc:
                    errors.append(str(exc))
            # Keep order, drop duplicates.
            setattr(self, role, list(dict.fromkeys(normed)))
        for role in ("prefill", "decode"):
            twice = sorted(set(self.both) & set(getattr(self, role)))
            check(not twice, f"{', '.join(twice)} given to both --both and --{role}: list "
                  "a kv_both instance under --both only")
        if self.register_port is None:
            check(bool(self.prefill or self.both), "no prefill instance: set --prefill "
                  "host:port (one or more; --both for kv_both instances) or enable "
                  "dynamic registration with --register-port")
            check(bool(self.decode or self.both), "no decode instance: set --decode "
                  "host:port (one or more; --both for kv_both instances) or enable "
                  "dynamic registration with --register-port")
        else:
            check(0 < self.register_port < 65536, "--register-port must be in 1..65535")
            check(self.register_port != self.port,
                  "--register-port must differ from --port")
        check(0 <= self.port < 65536, "--port must be in 0..65535")
        check(self.policy in POLICIES,
              f"unknown --policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        check(self.affinity_prefix_bytes >= 16, "--affinity-prefix-bytes must be >= 16")
        check(self.affinity_load_factor > 1.0,
              "--affinity-load-factor must be > 1.0 (1.25 allows 25% over the fair share)")
        check(self.model is None or bool(self.model.strip()), "--model must not be empty")
        check(self.heartbeat_ttl is None or self.heartbeat_ttl > 0,
              "--heartbeat-ttl must be > 0 seconds")
        check(self.health_interval >= 0, "--health-interval must be >= 0 (0 disables)")
        check(self.health_timeout > 0, "--health-timeout must be > 0")
        check(self.health_failures >= 1, "--health-failures must be >= 1")
        check(self.suspect_cooldown >= 0, "--suspect-cooldown must be >= 0")
        for name in ("connect_timeout", "first_byte_timeout", "event_gap_timeout",
                     "client_write_timeout"):
            check(getattr(self, name) > 0,
                  f"--{name.replace('_', '-')} must be > 0 seconds")
        check(self.nonstream_timeout >= 0, "--nonstream-timeout must be >= 0 (0 = no cap)")
        check(self.prefill_attempts >= 1, "--prefill-attempts must be >= 1")
        check(self.decode_attempts >= 1, "--decode-attempts must be >= 1")
        check(self.max_inflight >= 1, "--max-inflight must be >= 1")
        check(self.workers >= 1, "--workers must be >= 1 (1 runs a single process)")
        check(self.workers <= 1 or self.max_inflight >= self.workers,
              f"--max-inflight ({self.max_inflight}) is split between the workers, so it "
              f"must be >= --workers ({self.workers}): raise --max-inflight or lower "
              "--workers")
        check(self.retry_after >= 0, "--retry-after must be >= 0")
        check(self.max_body_bytes >= 1024, "--max-body-bytes must be >= 1024")
        check(self.body_timeout > 0, "--body-timeout must be > 0 seconds")
        check(self.drain_timeout >= 0, "--drain-timeout must be >= 0")
        check(self.backend_connections >= 1, "--backend-connections must be >= 1")
        check(self.backend_keepalive > 0,
              "--backend-keepalive must be > 0 seconds (below the instances' "
              "VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default)")
        check(self.release_timeout > 0, "--release-timeout must be > 0")
        check(self.kv_secret_env is None or bool(os.environ.get(self.kv_secret_env)),
              f"--kv-secret-env names ${self.kv_secret_env}, which is unset or empty: "
              "export the instances' shared secret in the proxy's environment")
        check(self.admin_token is None or len(self.admin_token) >= 8,
              "--admin-token must be at least 8 characters")
        if errors:
            raise ConfigError("invalid proxy configuration:\n  - " + "\n  - ".join(errors))
        return self

    def replace(self, **changes) -> "ProxyConfig":
        return dataclasses.replace(self, **changes)

    def inflight_share(self, index: int) -> int:
        """Worker ``index``'s part of ``max_inflight``: the quotient, one more
        for the first ``max_inflight % workers`` workers, so the shares add
        up to exactly ``max_inflight``."""
        base, extra = divmod(self.max_inflight, self.workers)
        return base + (1 if index < extra else 0)


class _Extend(argparse.Action):
    """nargs='+' that also accumulates over repeated flags."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = list(getattr(namespace, self.dest) or [])
        for value in values:
            # Also accept comma-separated lists: --prefill a:1,b:2
            current.extend(v for v in value.split(",") if v)
        setattr(namespace, self.dest, current)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the default is a secret (the admin token
    read from the environment), reads wrong (a negated flag's True) or is
    already explained in the help text."""

    _NO_DEFAULT = ("admin_token", "uvloop", "heartbeat_ttl")

    def _get_help_string(self, action):
        if action.dest in self._NO_DEFAULT:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = ProxyConfig()
    p = argparse.ArgumentParser(
        prog="p2p-disagg-proxy",
        description="Prefill/decode disaggregation proxy for vLLM (xPyD).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("front end")
    g.add_argument("--host", default=d.host, help="address to listen on")
    g.add_argument("--port", "--http-port", dest="port", type=int, default=d.port,
                   help="HTTP port (--http-port is an alias)")
    g.add_argument("--model", default=d.model,
                   help="served model name; other names get 404")
    g.add_argument("--max-inflight", type=int, default=d.max_inflight,
                   help="concurrent requests before answering 503 (in total: with "
                        "--workers N each worker admits its share)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="serving processes sharing the port, for more than one core "
                        "of relaying; 1 runs a single process")
    g.add_argument("--retry-after", type=int, default=d.retry_after,
                   help="Retry-After seconds sent with 503")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest accepted request body (413 above)")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="seconds a client has to send its whole request body (408 after)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="seconds to let in-flight requests finish on SIGTERM")
    g.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV, d.admin_token),
                   help="bearer token for /admin/instances (admin API off without it); "
                        f"also read from ${ADMIN_TOKEN_ENV}, which keeps it out of `ps`")
    g.add_argument("--access-log", action="store_true", help="log every request")
    g.add_argument("--log-level", default=d.log_level,
                   help="DEBUG, INFO, WARNING or ERROR")
    g.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                   help="use the default asyncio loop even if uvloop is installed")

    g = p.add_argument_group("instances")
    g.add_argument("--prefill", "--prefiller", nargs="+", action=_Extend, default=[],
                   metavar="HOST:PORT", help="prefill instances (repeatable)")
    g.add_argument("--decode", "--decoder", nargs="+", action=_Extend, default=[],
                   metavar="HOST:PORT", help="decode instances (repeatable)")
    g.add_argument("--both", nargs="+", action=_Extend, default=[], metavar="HOST:PORT",
                   help="kv_both instances, each used as prefill for some requests and "
                        "decode for others, never both for one request while another "
                        "instance can take the decode leg (repeatable)")
    g.add_argument("--register-port", type=int, default=d.register_port,
                   help="enable dynamic registration on this ZMQ port")
    g.add_argument("--register-host", default=d.register_host,
                   help="address the registration socket binds")
    g.add_argument("--heartbeat-ttl", type=float, default=d.heartbeat_ttl,
                   help="evict registered instances silent this long "
                        "(default: 3x their announced interval)")
    g.add_argument("--policy", choices=POLICIES, default=d.policy,
                   help="how each leg picks its instance (docs/proxy.md, Load balancing)")
    g.add_argument("--affinity-prefix-bytes", type=int, default=d.affinity_prefix_bytes,
                   help="prefix_affinity: leading bytes of the prompt (or chat messages, as "
                        "sent) that choose the instance; about the length of the prefix "
                        "your requests share (system prompt)")
    g.add_argument("--affinity-load-factor", type=float, default=d.affinity_load_factor,
                   help="prefix_affinity: pass over an instance holding more than this "
                        "times its fair share of outstanding requests")

    g = p.add_argument_group("health and failover")
    g.add_argument("--health-interval", type=float, default=d.health_interval,
                   help="seconds between GET /health probes (0 disables)")
    g.add_argument("--health-timeout", type=float, default=d.health_timeout,
                   help="seconds a GET /health probe may take")
    g.add_argument("--health-failures", type=int, default=d.health_failures,
                   help="consecutive failed probes before a node is taken out")
    g.add_argument("--suspect-cooldown", type=float, default=d.suspect_cooldown,
                   help="seconds a node that failed a request is avoided")
    g.add_argument("--prefill-attempts", type=int, default=d.prefill_attempts,
                   help="prefill instances tried per request (never the same twice)")
    g.add_argument("--decode-attempts", type=int, default=d.decode_attempts,
                   help="decode instances tried per request before its first event")

    g = p.add_argument_group("timeouts (no total cap)")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   help="seconds to open a connection to an instance")
    g.add_argument("--first-byte-timeout", type=float, default=d.first_byte_timeout,
                   help="prefill answer / first decode event")
    g.add_argument("--event-gap-timeout", type=float, default=d.event_gap_timeout,
                   help="longest silence between two SSE events")
    g.add_argument("--client-write-timeout", type=float, default=d.client_write_timeout,
                   help="longest a write to a client that stopped reading may wait; "
                        "then the request is cut and D's stream aborted")
    g.add_argument("--nonstream-timeout", type=float, default=d.nonstream_timeout,
                   help="cap for a non-streaming decode answer (0 = none)")
    g.add_argument("--backend-keepalive", type=float, default=d.backend_keepalive,
                   help="seconds an idle connection to an instance is kept; keep it below "
                        "the instances' VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s by default)")
    g.add_argument("--backend-connections", type=int, default=d.backend_connections,
                   help="connection pool size per backend")
    g.add_argument("--release-timeout", type=float, default=d.release_timeout,
                   help="seconds to wait for a producer to confirm it freed the KV of "
                        "a request that ended before decode")
    g.add_argument("--kv-secret-env", default=d.kv_secret_env, metavar="VAR",
                   help="environment variable holding the shared secret the instances "
                        "use (their shared_secret_env); the proxy signs the release of "
                        "abandoned transfers with it and refuses registrations not signed "
                        "with it")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> ProxyConfig:
    ns = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(ProxyConfig)}
    return ProxyConfig(**{k: v for k, v in vars(ns).items() if k in names})
