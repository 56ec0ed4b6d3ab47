"""The connector's configuration: one validated object, documented once.

Every key of ``kv_connector_extra_config`` is a field below; unknown keys are
rejected at start-up so a typo never silently falls back to a default.
``docs/configuration.md`` is generated from these definitions.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Annotated, Any, Literal

import msgspec

from vllm_ascend_pd import net

# Ports derive from kv_port; each producer worker rank r listens on
# kv_port + r (control) and on kv_port + GROUP_PORT_OFFSET + r for data
# (tcp's raw stream, or the process-group transports' rendezvous). So one instance owns
# [kv_port, kv_port + KV_PORT_SPAN). The llmdatadist transport's producer rank
# r listens on its NPU's device IP at llmdatadist_comm_port + r.
MAX_RANKS = 64
MIN_SECRET_CHARS = 16
GROUP_PORT_OFFSET = MAX_RANKS
KV_PORT_SPAN = 2 * MAX_RANKS

Transport = Literal["auto", "tcp", "hccl", "gloo", "llmdatadist"]


def _doc(text: str, **kw: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **kw)


class ConnectorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    transport: Annotated[Transport, _doc(
        "Data plane. `tcp`: a raw TCP stream per consumer, straight from cache "
        "to cache on the CPU, staged through host buffers from a device. `gloo`/`hccl`: a "
        "2-rank process group per producer/consumer rank pair. `llmdatadist`: CANN "
        "block pulls. `auto`: llmdatadist or hccl on NPUs, tcp elsewhere.")] = "auto"
    kv_ip: Annotated[str, _doc(
        "Address this instance advertises for KV pulls (producer) and binds to "
        "unless `kv_bind_host` is set: IPv4, IPv6 (e.g. `::1`, no brackets) or a host "
        "name. A name is resolved once at start-up, to IPv4 or IPv6 as the system's "
        "resolver orders its addresses (the lowest of that family if it has several), "
        "and the producer binds and advertises that address; start-up fails if the "
        "name does not resolve. Registration with a proxy announces it as this "
        "instance's HTTP host too. Default: the host's primary IP.")] = ""
    kv_bind_host: Annotated[str, _doc(
        "Address the producer's KV server binds to, e.g. `0.0.0.0`; a host name is "
        "resolved as for `kv_ip`. Default: `kv_ip`.")] = ""
    lease_s: Annotated[float, _doc(
        "How long a producer keeps a finished prefill's blocks for the consumer "
        "to pull before freeing them.", gt=0)] = 120.0
    registration_grace_s: Annotated[float, _doc(
        "How long the producer waits for a transfer to be registered when a pull "
        "races ahead of the producer's own bookkeeping (longer than one lost "
        "vLLM engine wake-up, see docs/known-issues.md).", gt=0)] = 8.0
    connect_timeout_s: Annotated[float, _doc(
        "Consumer: time to get a reply to a handshake or pull request.", gt=0)] = 10.0
    transfer_timeout_s: Annotated[float, _doc(
        "Longest silence tolerated while a transfer streams (consumer; with "
        "`gloo`/`hccl` also the producer and group set-up).", gt=0)] = 30.0
    chunk_mb: Annotated[float, _doc(
        "Most bytes one engine-step call moves (tcp), or one staged chunk on the "
        "wire (gloo, hccl).", gt=0, le=256)] = 2.0
    buffer_pool_mb: Annotated[float, _doc(
        "Fixed size of the staging pool (gloo/hccl: each side, on the device for "
        "hccl; tcp: only caches on a device or with strided blocks stage, one "
        "chunk per transfer in flight); bounds the memory transfers can use.", gt=0)] = 32.0
    pump_budget_ms: Annotated[float, _doc(
        "Longest time per engine step the connector spends moving KV data; "
        "bounds the decode latency a transfer can add.", gt=0, le=1000)] = 20.0
    idle_wait_ms: Annotated[float, _doc(
        "tcp: in an engine step that runs no model (only transfers pending), how "
        "long the connector may wait for its peer's next message, waking as soon "
        "as one arrives, instead of returning to vLLM's 1 ms polling loop. Cuts "
        "each control round trip to the message's own latency. Bounds how late "
        "a request arriving meanwhile is scheduled; it never moves more data per "
        "step than `pump_budget_ms` allows. 0 turns it off.", ge=0, le=100)] = 5.0
    shared_secret: Annotated[str, _doc(
        "Optional secret every instance of a deployment shares (at least "
        f"{MIN_SECRET_CHARS} characters). Handshakes, pulls and releases are "
        "signed with it (HMAC-SHA256 with a nonce and a timestamp, see "
        "docs/reliability.md); messages without a valid signature are refused. "
        "Prefer `shared_secret_env`, which keeps it off command lines.")] = ""
    shared_secret_env: Annotated[str, _doc(
        "Name of an environment variable holding the shared secret, e.g. "
        "`VLLM_ASCEND_PD_SHARED_SECRET`. Start-up fails if it is unset or empty. "
        "The proxy reads the same variable (`--kv-secret-env`) to release abandoned "
        "transfers and to check the instances' signed registrations.")] = ""
    proxy_ip: Annotated[str, _doc(
        "Register with a p2p_disagg_proxy at this address (dynamic xPyD): IPv4, "
        "IPv6 or a host name. Start-up fails if a name does not resolve; heartbeats "
        "keep using the name, so they follow a proxy whose address changes, over "
        "IPv6 when the resolver lists an IPv6 address first.")] = ""
    proxy_port: Annotated[int, _doc(
        "The proxy's `--register-port`.", ge=0, lt=65536)] = 0
    http_port: Annotated[int, _doc(
        "This instance's OpenAI HTTP port, announced to the proxy as "
        "`kv_ip:http_port` (`[kv_ip]:http_port` for IPv6): so vLLM's "
        "`--host` must cover that address.", ge=0, lt=65536)] = 0
    heartbeat_s: Annotated[float, _doc(
        "Interval between registration heartbeats.", gt=0)] = 3.0
    prefill_device_ips: Annotated[list[str], _doc(
        "llmdatadist, on a producer: IPv4 address of the NPU NIC of each "
        "tensor-parallel rank, in rank order (`hccn_tool -i <device> -ip -g`, or "
        "`vllm-ascend-pd doctor --devices 0,1,...`). Rank r listens on "
        "`prefill_device_ips[r]:llmdatadist_comm_port + r`. Empty: each rank "
        "reads its own NPU's IP with hccn_tool at start-up.")] = []
    decode_device_ips: Annotated[list[str], _doc(
        "llmdatadist, on a consumer: IPv4 address of the NPU NIC of each "
        "tensor-parallel rank, in rank order. The consumer links from these to "
        "the producer's device IPs, which it learns at the first pull. Empty: "
        "read with hccn_tool at start-up.")] = []
    llmdatadist_comm_port: Annotated[int, _doc(
        "llmdatadist: base listen port of the producer's LLMDataDist (rank r "
        "uses base + r on its device IP). Must not overlap this instance's "
        "`[kv_port, kv_port + 128)`.", gt=0, lt=65536)] = 26000


# Keys seen in older Ascend examples, mapped to what to use instead.
_RENAMED = {
    "prompt_device_ips": "prefill_device_ips",
    "kv_parallel_size": "nothing: vLLM 0.32 sizes transfers from tensor_parallel_size",
    "kv_rank": "nothing: the role is set by kv_role (kv_producer / kv_consumer / kv_both)",
    "kv_buffer_size": "`buffer_pool_mb`",
}


class ConfigError(ValueError):
    pass


def parse_extra_config(extra: dict[str, Any] | None) -> ConnectorConfig:
    extra = dict(extra or {})
    for old, new in _RENAMED.items():
        if old in extra:
            raise ConfigError(
                f"kv_connector_extra_config key {old!r} is not supported; use {new}"
            )
    try:
        cfg = msgspec.convert(extra, ConnectorConfig)
    except msgspec.ValidationError as e:
        known = ", ".join(sorted(ConnectorConfig.__struct_fields__))
        raise ConfigError(
            f"invalid kv_connector_extra_config for AscendSimpleConnector: {e}. "
            f"Known keys: {known}"
        ) from None
    for key in ConnectorConfig.__struct_fields__:
        value = getattr(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            # JSON as vLLM parses it allows Infinity; an infinite lease or
            # timeout never ends, an infinite pool size fails deep in start-up.
            raise ConfigError(
                f"kv_connector_extra_config {key} is {value}: give a finite number "
                f"(default {getattr(ConnectorConfig(), key)})"
            )
    for key in ("kv_ip", "kv_bind_host"):
        try:
            net.refuse_brackets(getattr(cfg, key), f"kv_connector_extra_config {key}")
        except net.HostError as e:
            raise ConfigError(str(e)) from None
    if bool(cfg.proxy_ip) != bool(cfg.proxy_port):
        raise ConfigError("set both proxy_ip and proxy_port to register with a proxy")
    if cfg.proxy_ip and not cfg.http_port:
        raise ConfigError(
            "registration with a proxy needs http_port (the port this instance's "
            "OpenAI server listens on) in kv_connector_extra_config"
        )
    for key in ("prefill_device_ips", "decode_device_ips"):
        for ip in getattr(cfg, key):
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                raise ConfigError(
                    f"{key} entry {ip!r} is not an IPv4 address; list the NPU device "
                    "IPs (`hccn_tool -i <device> -ip -g`), one per tensor-parallel rank"
                ) from None
    resolve_secret(cfg)  # fail at start-up, not at the first pull
    if cfg.buffer_pool_mb < 2 * cfg.chunk_mb:
        raise ConfigError(
            f"buffer_pool_mb ({cfg.buffer_pool_mb}) must hold at least two chunks "
            f"of chunk_mb ({cfg.chunk_mb})"
        )
    return cfg


def resolve_secret(cfg: ConnectorConfig) -> str:
    """The shared secret ("" when authentication is off)."""
    import os

    if cfg.shared_secret and cfg.shared_secret_env:
        raise ConfigError("set shared_secret or shared_secret_env, not both")
    secret = cfg.shared_secret
    if cfg.shared_secret_env:
        secret = os.environ.get(cfg.shared_secret_env, "")
        if not secret:
            raise ConfigError(
                f"shared_secret_env names {cfg.shared_secret_env!r}, but that environment "
                "variable is unset or empty: export it in the instance's environment"
            )
    if secret and len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the shared secret has {len(secret)} characters; use at least "
            f"{MIN_SECRET_CHARS} (e.g. `python -c 'import secrets; print(secrets.token_hex(16))'`)"
        )
    return secret


def resolve_kv_ip(cfg: ConnectorConfig) -> str:
    """kv_ip as an IP address (unset: the host's primary IP). A name is
    resolved here, at start-up, and the producer binds and advertises the
    address it got, so consumers and the proxy never resolve it themselves."""
    if not cfg.kv_ip:
        from vllm.utils.network_utils import get_ip

        return get_ip()
    return _address(cfg.kv_ip, "kv_ip")


def resolve_bind_host(cfg: ConnectorConfig) -> str:
    """The IP address a producer's KV sockets bind: kv_bind_host, else kv_ip."""
    return _address(cfg.kv_bind_host, "kv_bind_host") if cfg.kv_bind_host else resolve_kv_ip(cfg)


def check_proxy_ip(cfg: ConnectorConfig) -> None:
    """Fail at start-up when proxy_ip names nothing. The announcer itself
    keeps the name (ZMQ resolves it again on every reconnect, so the proxy
    may move), see announce.py."""
    if cfg.proxy_ip:
        _resolve(net.unbracket(cfg.proxy_ip), "proxy_ip")


def _resolve(host: str, key: str) -> list[str]:
    try:
        return net.resolve(host, f"kv_connector_extra_config {key}")
    except net.HostError as e:
        raise ConfigError(str(e)) from None


def _address(host: str, key: str) -> str:
    found = _resolve(host, key)
    if len(found) > 1:
        from vllm_ascend_pd.log import get_logger

        get_logger(__name__).warning(
            "kv_connector_extra_config %s %r names several addresses (%s); using %s: set "
            "%s to one address to choose another", key, host, ", ".join(found), found[0], key)
    return found[0]


def control_port(kv_port: int, rank: int) -> int:
    if not 0 <= rank < MAX_RANKS:
        raise ConfigError(f"worker rank {rank} exceeds the {MAX_RANKS}-rank port plan")
    port = kv_port + rank
    if port >= 65536:
        raise ConfigError(f"kv_port {kv_port} + rank {rank} exceeds 65535; lower kv_port")
    return port


def group_port(kv_port: int, rank: int) -> int:
    port = control_port(kv_port, rank) + GROUP_PORT_OFFSET
    if port >= 65536:
        raise ConfigError(
            f"kv_port {kv_port} + {GROUP_PORT_OFFSET} + rank {rank} (this rank's KV data "
            f"port) exceeds 65535; lower kv_port to at most {65535 - KV_PORT_SPAN + 1}"
        )
    return port


def llmdatadist_endpoint(
    cfg: ConnectorConfig, *, kv_port: int, rank: int, tp_size: int, is_producer: bool
) -> tuple[str, int]:
    """This rank's (device IP, LLMDataDist listen port); ConfigError says what to set.

    An empty IP list gives "" for the IP: the transport then reads the device
    IP with hccn_tool itself."""
    key = "prefill_device_ips" if is_producer else "decode_device_ips"
    ips = getattr(cfg, key)
    if ips and len(ips) < tp_size:
        role = "producer" if is_producer else "consumer"
        raise ConfigError(
            f"transport llmdatadist on a {role} needs {key} with one NPU device IP per "
            f"tensor-parallel rank ({tp_size}), got {len(ips)}: read them with "
            "`hccn_tool -i <device> -ip -g` (or `vllm-ascend-pd doctor --devices 0,1,...`) and set "
            f"{key} in kv_connector_extra_config, or choose transport tcp"
        )
    base = cfg.llmdatadist_comm_port
    if base + tp_size - 1 >= 65536:
        raise ConfigError(
            f"llmdatadist_comm_port {base} + {tp_size - 1} exceeds 65535; lower it"
        )
    if base < kv_port + KV_PORT_SPAN and kv_port < base + tp_size:
        raise ConfigError(
            f"llmdatadist ports [{base}, {base + tp_size}) overlap the KV ports "
            f"[{kv_port}, {kv_port + KV_PORT_SPAN}) of kv_port {kv_port}: move "
            "llmdatadist_comm_port or kv_port so the ranges are apart"
        )
    return (ips[rank] if ips else ""), base + rank
