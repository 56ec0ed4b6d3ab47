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
* injects failures: ``FABRIC.link_status`` / ``FABRIC.pull_error``.

Unlike the real package, several LLMDataDist instances may live in one
process (producer and consumer of one test).
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import math
import socket


class LLMRole(enum.Enum):
    PROMPT = 1
    DECODER = 2
    MIX = 3


class LLMStatusCode(enum.Enum):
    LLM_SUCCESS = 0
    LLM_FAILED = 1
    LLM_PARAM_INVALID = 2
    LLM_TIMEOUT = 3
    LLM_LINK_FAILED = 4
    LLM_ALREADY_LINK = 5
    LLM_NOT_YET_LINK = 6
    LLM_KV_CACHE_NOT_EXIST = 7


class LLMException(RuntimeError):
    def __init__(self, message: str, status_code: LLMStatusCode = LLMStatusCode.LLM_FAILED):
        super().__init__(message)
        self.status_code = status_code


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
        if not isinstance(shape, list) or not all(isinstance(x, int) for x in shape):
            raise TypeError("shape must be a list of int")
        if not isinstance(data_type, DataType):
            raise TypeError("data_type must be a DataType")
        self.num_tensors = num_tensors
        self.shape = shape
        self.data_type = data_type

    @property
    def block_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.data_type.itemsize


class BlocksCacheKey:
    def __init__(self, prompt_cluster_id: int, model_id: int = 0):
        self.cluster_id = prompt_cluster_id
        self.model_id = model_id


class Cache:
    def __init__(self, cache_id: int, desc: CacheDesc, addrs: list[int]):
        self.cache_id = cache_id
        self.cache_desc = desc
        self.tensor_addrs = addrs
        self.is_blocks_cache = True


def _check_ip(ip: str) -> None:
    socket.inet_aton(ip)  # the real package converts with inet_aton too


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
        if not isinstance(value, int) or not 0 <= value < 2**64:
            raise ValueError("remote_cluster_id must be a uint64")
        self._remote_cluster_id = value

    def append_local_ip_info(self, ip: str, port: int) -> None:
        _check_ip(ip)
        self.local_ip_info_list.append((ip, port))

    def append_remote_ip_info(self, ip: str, port: int) -> None:
        _check_ip(ip)
        self.remote_ip_info_list.append((ip, port))


class LLMConfig:
    def __init__(self):
        self.device_id = None
        self.sync_kv_timeout = None
        self.enable_cache_manager = None
        self.listen_ip_info = ""

    def generate_options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
        if self.device_id is not None:
            if not isinstance(self.device_id, int) or self.device_id < 0:
                raise TypeError("device_id must be an int >= 0")
            opts["ge.exec.deviceId"] = str(self.device_id)
        if self.sync_kv_timeout is not None:
            if int(self.sync_kv_timeout) <= 0:
                raise ValueError("sync_kv_timeout should be greater than zero.")
            opts["llm.SyncKvCacheWaitTime"] = str(self.sync_kv_timeout)
        if self.enable_cache_manager is not None:
            opts["llm.EnableCacheManager"] = "1" if self.enable_cache_manager else "0"
        if self.listen_ip_info:
            opts["llm.listenIpInfo"] = str(self.listen_ip_info)
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
            raise LLMException("register before link", LLMStatusCode.LLM_FAILED)
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
        FABRIC.calls.append(("pull_blocks", self._owner.cluster_id, src_cache_key.cluster_id,
                             src_cache_key.model_id, list(src_blocks), list(dst_blocks)))
        if not dst_blocks or len(src_blocks) != len(dst_blocks):
            raise ValueError("src_blocks and dst_blocks must be non-empty and equally long")
        remote = self._owner.links.get(src_cache_key.cluster_id)
        if remote is None:
            raise LLMException("not linked", LLMStatusCode.LLM_NOT_YET_LINK)
        if FABRIC.pull_error is not None:
            raise LLMException("injected pull failure", FABRIC.pull_error)
        src_cache = remote.cache_manager.registered.get(src_cache_key.model_id)
        if src_cache is None:
            raise LLMException("no such remote cache", LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)
        s, d = src_cache.cache_desc, dst_cache.cache_desc
        if (s.num_tensors, s.shape[1:], s.data_type) != (d.num_tensors, d.shape[1:], d.data_type):
            raise LLMException("cache descs differ", LLMStatusCode.LLM_PARAM_INVALID)
        for b, limit in ((src_blocks, s.shape[0]), (dst_blocks, d.shape[0])):
            if any(not 0 <= x < limit for x in b):
                raise LLMException("block id out of range", LLMStatusCode.LLM_PARAM_INVALID)
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
            raise TypeError("role must be an LLMRole")
        if not isinstance(cluster_id, int) or not 0 <= cluster_id < 2**64:
            raise ValueError("cluster_id must be a uint64")
        self.role = role
        self.cluster_id = cluster_id
        self.options: dict[str, str] | None = None
        self.links: dict[int, LLMDataDist] = {}
        self.linked = False
        self._manager: CacheManager | None = None
        self._listen: tuple[str, int] | None = None

    def init(self, options: dict[str, str]) -> None:
        FABRIC.calls.append(("init", self.cluster_id, self.role, dict(options)))
        if options.get("llm.EnableCacheManager") != "1":
            raise LLMException("this fake only models cache-manager mode")
        if "llm.listenIpInfo" in options:
            ip, port = options["llm.listenIpInfo"].rsplit(":", 1)
            _check_ip(ip)
            if (ip, int(port)) in FABRIC.listeners:
                raise LLMException("listen address in use", LLMStatusCode.LLM_FAILED)
            self._listen = (ip, int(port))
            FABRIC.listeners[self._listen] = self
        self.options = dict(options)
        self._manager = CacheManager(self)

    @property
    def cache_manager(self) -> CacheManager:
        if self._manager is None:
            raise RuntimeError("llm datadist is not initialized")
        return self._manager

    def link_clusters(self, clusters, timeout=3000):
        if not isinstance(timeout, int) or timeout <= 0:
            raise ValueError("timeout must be a positive int (ms)")
        rets = []
        for c in clusters:
            remote_addr = c.remote_ip_info_list[0]
            FABRIC.calls.append(("link_clusters", self.cluster_id, c.remote_cluster_id, remote_addr))
            if not c.local_ip_info_list:
                raise LLMException("local_ip_info_list is empty", LLMStatusCode.LLM_PARAM_INVALID)
            server = FABRIC.listeners.get(remote_addr)
            if FABRIC.link_status is not None:
                rets.append(FABRIC.link_status)
            elif server is None or server.cluster_id != c.remote_cluster_id:
                rets.append(LLMStatusCode.LLM_LINK_FAILED)
            else:
                self.links[c.remote_cluster_id] = server
                self.linked = True
                rets.append(LLMStatusCode.LLM_SUCCESS)
        ok = all(r == LLMStatusCode.LLM_SUCCESS for r in rets)
        return (LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_FAILED), rets

    def unlink_clusters(self, clusters, timeout=3000, force=False):
        rets = []
        for c in clusters:
            FABRIC.calls.append(("unlink_clusters", self.cluster_id, c.remote_cluster_id, force))
            rets.append(LLMStatusCode.LLM_SUCCESS if self.links.pop(c.remote_cluster_id, None)
                        else LLMStatusCode.LLM_NOT_YET_LINK)
        return LLMStatusCode.LLM_SUCCESS, rets

    def finalize(self) -> None:
        FABRIC.calls.append(("finalize", self.cluster_id))
        if self._listen is not None:
            FABRIC.listeners.pop(self._listen, None)
        self._manager = None
