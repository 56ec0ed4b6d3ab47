"""FAKE of CANN's ``llm_datadist`` Python package, for unit tests only.

There is no NPU, CANN or llm_datadist on the CPU test machines. Tests put
this module in ``sys.modules["llm_datadist"]`` so the llmdatadist transport
runs unchanged against it. It mirrors the part of the real API the transport
uses (cache-manager mode: LLMDataDist / LLMConfig / CacheDesc /
BlocksCacheKey / LLMClusterInfo, link_clusters, register_blocks_cache,
pull_blocks, unlink_clusters, unregister_cache, finalize), with the real
argument checks where they matter, and:

* records every call in ``FABRIC.calls`` so tests can check the sequence;
* really moves bytes: ``pull_blocks`` copies the requested blocks between
  the registered (CPU) tensors by address, so tests can check data exactly;
* injects failures: ``FABRIC.link_status`` / ``FABRIC.pull_error`` /
  ``FABRIC.unlink_status``, and holds pulls at ``FABRIC.pull_gate``;
* models both ends of a link: ``unlink_clusters(force=False)`` is sent by
  the client and also removes the server's end, ``force=True`` removes only
  the caller's end (CANN's LLMDataDist API reference);
* refuses ``finalize`` while another call of the same instance runs (the
  reference forbids calling it concurrently with other interfaces).

Argument checks follow the package's own Python layer (hicann/hixl,
src/python/llm_datadist): TypeError / ValueError for wrong types and
ranges, LLMException(status_code=LLM_PARAM_INVALID) for its raise_if checks.

Unlike the real package, several LLMDataDist instances may live in one
process (producer and consumer of one test).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import math
import socket
import threading


class LLMRole(enum.Enum):
    PROMPT = 1
    DECODER = 2
    MIX = 3


class LLMStatusCode(enum.IntEnum):
    # The names the transport may meet; the real values come from the C++ layer.
    LLM_SUCCESS = 0
    LLM_FAILED = 1
    LLM_PARAM_INVALID = 2
    LLM_KV_CACHE_NOT_EXIST = 3
    LLM_NOT_YET_LINK = 4
    LLM_ALREADY_LINK = 5
    LLM_LINK_FAILED = 6
    LLM_UNLINK_FAILED = 7
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = 8
    LLM_CLUSTER_NUM_EXCEED_LIMIT = 9
    LLM_EXIST_LINK = 10
    LLM_TIMEOUT = 11
    LLM_LINK_BUSY = 12
    LLM_UNKNOWN_ERROR = -1


class LLMException(RuntimeError):
    # As in the real package: status_code is keyword-only.
    def __init__(self, *args, status_code: LLMStatusCode = LLMStatusCode.LLM_SUCCESS):
        super().__init__(*args)
        self._status_code = status_code

    @property
    def status_code(self) -> LLMStatusCode:
        return self._status_code


def _param(ok: bool, message: str) -> None:
    if not ok:
        raise LLMException(message, status_code=LLMStatusCode.LLM_PARAM_INVALID)


def _int_in(name: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} only support ['int'], but got {type(value)}.")
    if not lo <= value <= hi:
        raise ValueError(f"{name}'s value is out of range, {value}.")


def _int32(name: str, value) -> None:
    _int_in(name, value, -(2**31), 2**31 - 1)


class DataType(enum.Enum):
    DT_FLOAT16 = "float16"
    DT_BF16 = "bfloat16"
    DT_FLOAT = "float32"
    DT_INT8 = "int8"

    @property
    def itemsize(self) -> int:
        return {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}[self.value]


class CacheDesc:
    def __init__(self, num_tensors: int, shape: list[int], data_type: DataType):
        _int_in("num_tensors", num_tensors, 0, 2**32 - 1)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(x, int) for x in shape):
            raise TypeError("shape only support ['tuple', 'list'] of int")
        if not isinstance(data_type, DataType):
            raise TypeError("data_type only support ['DataType']")
        self.num_tensors = num_tensors
        self.shape = list(shape)
        self.data_type = data_type

    @property
    def block_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.data_type.itemsize


class BlocksCacheKey:
    def __init__(self, cluster_id: int, model_id: int = 0):
        if not isinstance(cluster_id, int) or not isinstance(model_id, int):
            raise TypeError("cluster_id and model_id only support ['int']")
        self.cluster_id = cluster_id
        self.model_id = model_id


class Cache:
    def __init__(self, cache_id: int, desc: CacheDesc, addrs: list[int]):
        self.cache_id = cache_id
        self.cache_desc = desc
        self.tensor_addrs = addrs
        self.is_blocks_cache = True


def _check_ip(ip: str) -> None:
    if not isinstance(ip, str):
        raise TypeError("ip only support ['str', 'int']")
    try:
        socket.inet_aton(ip)  # the real package converts with inet_aton too
    except OSError:
        raise RuntimeError(f"Can not parse ip str:{ip}") from None


class LLMClusterInfo:
    def __init__(self):
        self._remote_cluster_id = None
        self.local_ip_info_list: list[tuple[str, int]] = []
        self.remote_ip_info_list: list[tuple[str, int]] = []

    @property
    def remote_cluster_id(self):
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, value: int):
        _int_in("remote_cluster_id", value, 0, 2**64 - 1)
        self._remote_cluster_id = value

    def append_local_ip_info(self, ip: str, port: int) -> None:
        _check_ip(ip)
        _int_in("port", port, 0, 2**16 - 1)
        self.local_ip_info_list.append((ip, port))

    def append_remote_ip_info(self, ip: str, port: int) -> None:
        _check_ip(ip)
        _int_in("port", port, 0, 2**16 - 1)
        self.remote_ip_info_list.append((ip, port))


def _typed(kind: type):
    def check(name: str, value) -> None:
        if not isinstance(value, kind):
            raise TypeError(f"{name} only support ['{kind.__name__}']")
    return check


def _check_device_id(name: str, value) -> None:
    _int32(name, value)
    _param(value >= 0, f"{name} should be greater than or equal to zero.")


def _check_sync_kv_timeout(name: str, value) -> None:
    if not isinstance(value, (int, str)):
        raise TypeError(f"{name} only support ['int', 'str']")
    _param(int(value) > 0, f"{name} should be greater than zero.")
    _int32(name, int(value))


class _Option:
    """One LLMConfig attribute as the real class has it: the setter checks the
    value, and generate_options writes it under ``key`` once it differs from
    its default."""

    def __init__(self, key: str, check, default=None):
        self.key, self.check, self.default = key, check, default

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, conf, owner=None):
        if conf is None:
            return self
        return conf._values.get(self.name, self.default)

    def __set__(self, conf, value) -> None:
        self.check(self.name, value)
        conf._values[self.name] = value

    def render(self, value) -> str:
        return str(value)


class _Flag(_Option):
    """A bool option: reads False until set, written as "1" or "0"."""

    def __init__(self, key: str):
        super().__init__(key, _typed(bool))

    def __get__(self, conf, owner=None):
        return self if conf is None else bool(super().__get__(conf))

    def render(self, value) -> str:
        return "1" if value else "0"


class LLMConfig:
    """The setters check like the real ones; an attribute the real class does
    not have is refused (the real one would silently ignore it)."""

    __slots__ = ("_values",)

    listen_ip_info = _Option("llm.listenIpInfo", _typed(str), default="")
    device_id = _Option("ge.exec.deviceId", _check_device_id)
    sync_kv_timeout = _Option("llm.SyncKvCacheWaitTime", _check_sync_kv_timeout)
    enable_cache_manager = _Flag("llm.EnableCacheManager")
    enable_remote_cache_accessible = _Flag("llm.EnableRemoteCacheAccessible")

    def __init__(self):
        self._values: dict[str, object] = {}

    def generate_options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
        for opt in vars(LLMConfig).values():
            if isinstance(opt, _Option):
                value = self._values.get(opt.name, opt.default)
                if value != opt.default:
                    opts[opt.key] = opt.render(value)
        return opts


class Fabric:
    """The fake's shared world: listeners, the call log, failure switches."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.listeners: dict[tuple[str, int], LLMDataDist] = {}
        self.calls: list[tuple] = []
        self.link_status: LLMStatusCode | None = None  # force link_clusters' result
        self.pull_error: LLMStatusCode | None = None  # make pull_blocks raise
        # force the per-cluster result of a non-forced unlink_clusters
        self.unlink_status: LLMStatusCode | None = None
        self.pull_gate: threading.Event | None = None  # pull_blocks waits for it
        self._ids = itertools.count(1)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


FABRIC = Fabric()


class CacheManager:
    def __init__(self, owner: "LLMDataDist"):
        self._owner = owner
        self.registered: dict[int, Cache] = {}  # model_id -> cache

    def register_blocks_cache(self, cache_desc: CacheDesc, addrs: list[int], blocks_cache_key=None) -> Cache:
        if not isinstance(cache_desc, CacheDesc):
            raise TypeError("cache_desc must be a CacheDesc")
        if not addrs or len(addrs) != cache_desc.num_tensors or 0 in addrs:
            raise ValueError("addrs must hold num_tensors non-zero addresses")
        if self._owner.linked:
            raise LLMException("register before link", status_code=LLMStatusCode.LLM_FAILED)
        cache = Cache(next(FABRIC._ids), cache_desc, list(addrs))
        model_id = blocks_cache_key.model_id if blocks_cache_key is not None else -1
        if blocks_cache_key is not None:
            if blocks_cache_key.cluster_id != self._owner.cluster_id:
                raise ValueError("a BlocksCacheKey names this cluster")
            self.registered[model_id] = cache
        FABRIC.calls.append(("register_blocks_cache", self._owner.cluster_id, model_id,
                             cache_desc.num_tensors, tuple(cache_desc.shape)))
        return cache

    def pull_blocks(self, src_cache_key: BlocksCacheKey, dst_cache: Cache, src_blocks=(), dst_blocks=()) -> None:
        with self._owner.call("pull_blocks"):
            self._pull_blocks(src_cache_key, dst_cache, src_blocks, dst_blocks)

    def _pull_blocks(self, src_cache_key, dst_cache, src_blocks, dst_blocks) -> None:
        FABRIC.calls.append(("pull_blocks", self._owner.cluster_id, src_cache_key.cluster_id,
                             src_cache_key.model_id, list(src_blocks), list(dst_blocks)))
        for name, b in (("src_blocks", src_blocks), ("dst_blocks", dst_blocks)):
            if not isinstance(b, (list, tuple)) or not all(isinstance(x, int) for x in b):
                raise TypeError(f"{name} only support ['list', 'tuple'] of int")
        _param(len(dst_blocks) > 0, "dst_blocks can not be empty.")
        _param(len(src_blocks) > 0, "src_blocks can not be empty.")
        _param(len(src_blocks) == len(dst_blocks), "src_blocks and dst_blocks differ in length")
        if FABRIC.pull_gate is not None:
            FABRIC.pull_gate.wait(10)
        remote = self._owner.links.get(src_cache_key.cluster_id)
        if remote is None:
            raise LLMException("not linked", status_code=LLMStatusCode.LLM_NOT_YET_LINK)
        if FABRIC.pull_error is not None:
            raise LLMException("injected pull failure", status_code=FABRIC.pull_error)
        src_cache = remote.cache_manager.registered.get(src_cache_key.model_id)
        if src_cache is None:
            raise LLMException("no such remote cache", status_code=LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)
        s, d = src_cache.cache_desc, dst_cache.cache_desc
        if (s.num_tensors, s.shape[1:], s.data_type) != (d.num_tensors, d.shape[1:], d.data_type):
            raise LLMException("cache descs differ", status_code=LLMStatusCode.LLM_PARAM_INVALID)
        for b, limit in ((src_blocks, s.shape[0]), (dst_blocks, d.shape[0])):
            if any(not 0 <= x < limit for x in b):
                raise LLMException("block id out of range", status_code=LLMStatusCode.LLM_PARAM_INVALID)
        n = s.block_bytes
        for sa, da in zip(src_cache.tensor_addrs, dst_cache.tensor_addrs):
            for sb, db in zip(src_blocks, dst_blocks):
                ctypes.memmove(da + db * n, sa + sb * n, n)

    def unregister_cache(self, cache_id: int) -> None:
        FABRIC.calls.append(("unregister_cache", self._owner.cluster_id, cache_id))
        for k, c in list(self.registered.items()):
            if c.cache_id == cache_id:
                del self.registered[k]


class LLMDataDist:
    def __init__(self, role: LLMRole, cluster_id: int):
        if not isinstance(role, LLMRole):
            raise TypeError("role only support ['LLMRole']")
        _int_in("cluster_id", cluster_id, 0, 2**64 - 1)
        self.role = role
        self.cluster_id = cluster_id
        self.options: dict[str, str] | None = None
        self.links: dict[int, LLMDataDist] = {}  # our client ends, by server cluster id
        self.inbound: set[int] = set()  # server ends: client cluster ids linked to us
        self.linked = False
        self._manager: CacheManager | None = None
        self._listen: tuple[str, int] | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()

    class _Call:
        def __init__(self, owner: "LLMDataDist"):
            self.owner = owner

        def __enter__(self):
            with self.owner._busy_lock:
                self.owner._busy += 1

        def __exit__(self, *exc):
            with self.owner._busy_lock:
                self.owner._busy -= 1

    def call(self, name: str) -> "LLMDataDist._Call":
        return LLMDataDist._Call(self)

    def init(self, options: dict[str, str]) -> None:
        FABRIC.calls.append(("init", self.cluster_id, self.role, dict(options)))
        if options.get("llm.EnableCacheManager") != "1":
            raise LLMException("this fake only models cache-manager mode", status_code=LLMStatusCode.LLM_FAILED)
        if "llm.listenIpInfo" in options:
            ip, port = options["llm.listenIpInfo"].rsplit(":", 1)
            _check_ip(ip)
            if (ip, int(port)) in FABRIC.listeners:
                raise LLMException("listen address in use", status_code=LLMStatusCode.LLM_FAILED)
            self._listen = (ip, int(port))
            FABRIC.listeners[self._listen] = self
        self.options = dict(options)
        self._manager = CacheManager(self)

    @property
    def cache_manager(self) -> CacheManager:
        if self._manager is None:
            raise RuntimeError("llm datadist is not initialized")
        return self._manager

    @staticmethod
    def _check_clusters(clusters, timeout) -> None:
        _int32("timeout", timeout)
        _param(timeout > 0, "Param timeout should be greater than 0.")
        if not isinstance(clusters, (list, tuple)) or not all(isinstance(c, LLMClusterInfo) for c in clusters):
            raise TypeError("clusters only support ['list', 'tuple'] of LLMClusterInfo")

    def link_clusters(self, clusters, timeout=3000):
        self._check_clusters(clusters, timeout)
        with self.call("link_clusters"):
            rets = []
            for c in clusters:
                _param(bool(c.local_ip_info_list), "local_ip_info_list is empty.")
                _int_in("remote_cluster_id", c.remote_cluster_id, 0, 2**64 - 1)
                remote_addr = c.remote_ip_info_list[0]
                FABRIC.calls.append(("link_clusters", self.cluster_id, c.remote_cluster_id, remote_addr))
                server = FABRIC.listeners.get(remote_addr)
                if FABRIC.link_status is not None:
                    rets.append(FABRIC.link_status)
                elif server is None or server.cluster_id != c.remote_cluster_id:
                    rets.append(LLMStatusCode.LLM_LINK_FAILED)
                else:
                    self.links[c.remote_cluster_id] = server
                    server.inbound.add(self.cluster_id)
                    self.linked = True
                    rets.append(LLMStatusCode.LLM_SUCCESS)
            ok = all(r == LLMStatusCode.LLM_SUCCESS for r in rets)
            return (LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_FAILED), rets

    def unlink_clusters(self, clusters, timeout=3000, force=False):
        """force=False: sent by the client, tears down both ends. force=True:
        tears down only this end; the other end must unlink too."""
        self._check_clusters(clusters, timeout)
        if not isinstance(force, bool):
            raise TypeError("force only support ['bool']")
        with self.call("unlink_clusters"):
            rets = []
            for c in clusters:
                _int_in("remote_cluster_id", c.remote_cluster_id, 0, 2**64 - 1)
                FABRIC.calls.append(("unlink_clusters", self.cluster_id, c.remote_cluster_id, force))
                if not force and FABRIC.unlink_status is not None:
                    rets.append(FABRIC.unlink_status)
                    continue
                server = self.links.pop(c.remote_cluster_id, None)
                if force:
                    self.inbound.discard(c.remote_cluster_id)
                    rets.append(LLMStatusCode.LLM_SUCCESS)
                elif server is None:
                    rets.append(LLMStatusCode.LLM_NOT_YET_LINK)
                else:
                    server.inbound.discard(self.cluster_id)
                    rets.append(LLMStatusCode.LLM_SUCCESS)
            ok = all(r == LLMStatusCode.LLM_SUCCESS for r in rets)
            return (LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_FAILED), rets

    def finalize(self) -> None:
        FABRIC.calls.append(("finalize", self.cluster_id))
        if self._busy:
            raise LLMException("finalize must not run concurrently with other calls",
                               status_code=LLMStatusCode.LLM_FAILED)
        if self._listen is not None:
            FABRIC.listeners.pop(self._listen, None)
        # Our client ends go with us; the servers' ends stay until they notice.
        self.links.clear()
        self._manager = None
