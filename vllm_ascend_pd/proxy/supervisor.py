"""The multi-worker proxy (``--workers N``, N > 1): one supervisor process.

The proxy relays every SSE event through Python, about 54 µs of CPU per
event (docs/proxy-benchmark.md), so one process tops out at one core.  The
supervisor

* binds the HTTP listening sockets itself, one per address ``--host``
  resolves to (a taken ``--port`` fails here, at once), and keeps them open
  for its whole life, so workers that restart never leave the port unserved;
* starts N worker processes (multiprocessing *spawn*) that all accept on
  those sockets and run the usual application (proxy/worker.py);
* owns dynamic membership: the registration socket and the admin changes
  the workers forward (proxy/hub.py, proxy/membership.py);
* owns prometheus_client's multiprocess directory, so any worker's
  ``/metrics`` reports all workers;
* restarts a worker that dies, and gives up with exit status 1 if workers
  keep dying (``CRASH_LIMIT`` within ``CRASH_WINDOW_S``);
* on SIGTERM/SIGINT has every worker drain (``--drain-timeout``), kills
  what is still running ``KILL_GRACE_S`` seconds later, removes its temp
  dir and exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Optional

from vllm_ascend_pd.net import host_port
from vllm_ascend_pd.proxy.config import ConfigError, ProxyConfig
from vllm_ascend_pd.proxy import aio
from vllm_ascend_pd.proxy.log import init_logger
from vllm_ascend_pd.proxy.shared_load import SharedLoad

logger = init_logger(__name__)

PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CRASH_LIMIT = 5          # unexpected worker exits ...
CRASH_WINDOW_S = 30.0    # ... within this many seconds stop the proxy
KILL_GRACE_S = 10.0      # after --drain-timeout, before SIGKILL
BACKLOG = 4096


class ListenError(RuntimeError):
    pass


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to.

    The same addresses the single-process proxy binds (asyncio's
    ``create_server``): ``localhost`` may be 127.0.0.1 and ::1, an empty
    host is every interface of each family.  If any of them cannot be bound,
    the ones already bound are closed and ListenError names the address.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve --host {host!r}: {exc}") from None
    # /etc/hosts may list an address twice; binding it twice would clash.
    unique = dict.fromkeys((family, kind, proto, addr)
                           for family, kind, proto, _, addr in infos)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, addr in unique:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # a family this kernel lacks, as asyncio does
                logger.debug("skipping %s for --host %r: %s", addr, host, exc)
                continue
            socks.append(sock)
            _listen(sock, addr, host)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise ListenError(f"cannot listen on --host {host!r}: no address it resolves to "
                          "can be bound")
    return socks


def _listen(sock: socket.socket, addr: tuple, host: str) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        where = host_port(addr[0], addr[1])
        if host != addr[0]:
            where += f" (--host {host!r})"
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}; choose "
                          "another --port or stop what is using it") from None


class CrashGuard:
    """Counts unexpected worker exits in a sliding window."""

    def __init__(self, limit: int = CRASH_LIMIT, window: float = CRASH_WINDOW_S):
        self.limit, self.window = limit, window
        self._times: collections.deque[float] = collections.deque()

    def record(self, now: float) -> bool:
        """Note one crash; True when there were ``limit`` within ``window``."""
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        return len(self._times) >= self.limit


def describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, cfg: ProxyConfig):
        self.cfg = cfg
        self._mp = multiprocessing.get_context("spawn")
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._guard = CrashGuard()
        self._socks: list[socket.socket] = []
        self._tmp = ""
        self._metrics_dir = ""
        self._hub = None
        self._stopping = False
        self._stop_requested: Optional[asyncio.Event] = None
        self._all_exited: Optional[asyncio.Event] = None
        self._exit_code = 0

    # -- entry ------------------------------------------------------------
    def run(self) -> int:
        """Serve until told to stop; returns the process exit status."""
        cfg = self.cfg
        try:
            self._socks = bind_listeners(cfg.host, cfg.port)
        except ListenError as exc:
            logger.error("%s", exc)
            return 1
        self._tmp = tempfile.mkdtemp(prefix="pd-proxy-")
        logger.info("supervisor state (metrics files, ipc sockets) in %s", self._tmp)
        metrics_dir = os.path.join(self._tmp, "metrics")
        os.mkdir(metrics_dir)
        self._load_path = os.path.join(self._tmp, "load")
        SharedLoad.create(self._load_path, cfg.workers)
        previous = os.environ.get(PROMETHEUS_DIR_ENV)
        if previous:
            logger.warning("ignoring %s=%s: the proxy uses a directory of its own",
                           PROMETHEUS_DIR_ENV, previous)
        # Inherited by the workers, which import prometheus_client after it
        # is set: that is what selects the multiprocess mode there.
        os.environ[PROMETHEUS_DIR_ENV] = metrics_dir
        try:
            with aio.Runner() as runner:
                return runner.run(self._main(metrics_dir))
        except ConfigError as exc:
            logger.error("%s", exc)
            return 2
        finally:
            self._close_listener()
            if previous is None:
                os.environ.pop(PROMETHEUS_DIR_ENV, None)
            else:
                os.environ[PROMETHEUS_DIR_ENV] = previous
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _main(self, metrics_dir: str) -> int:
        from vllm_ascend_pd.proxy.hub import MembershipHub

        cfg = self.cfg
        self._metrics_dir = metrics_dir
        self._stop_requested, self._all_exited = asyncio.Event(), asyncio.Event()
        self._hub = MembershipHub(cfg, control=f"ipc://{self._tmp}/control",
                                  updates=f"ipc://{self._tmp}/updates")
        self._hub.start()
        try:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._request_stop, sig.name)
            for index in range(cfg.workers):
                self._start(index)
            logger.info("proxy listening on %s with %d workers (--max-inflight %d "
                        "split %s)", ", ".join(
                            "http://" + host_port(*s.getsockname()[:2])
                            for s in self._socks), cfg.workers,
                        cfg.max_inflight,
                        "/".join(str(cfg.inflight_share(i)) for i in range(cfg.workers)))
            await self._stop_requested.wait()
            await self._stop_workers()
        finally:
            await self._hub.stop()
        logger.info("proxy stopped")
        return self._exit_code

    # -- workers ----------------------------------------------------------
    def _start(self, index: int) -> None:
        from vllm_ascend_pd.proxy.worker import WorkerContext, run_worker

        hub = self._hub
        ctx = WorkerContext(
            index=index, count=self.cfg.workers, parent_pid=os.getpid(),
            control=hub.control, updates=hub.updates, metrics_dir=self._metrics_dir,
            registration=hub.registration.endpoint if hub.registration else None,
            load_path=self._load_path)
        proc = self._mp.Process(target=run_worker, args=(self.cfg, self._socks, ctx),
                                name=f"pd-proxy-worker-{index}", daemon=True)
        proc.start()
        self._procs[index] = proc
        asyncio.get_running_loop().add_reader(proc.sentinel, self._on_exit, index, proc)
        logger.info("worker %d started (pid %d)", index, proc.pid)

    def _on_exit(self, index: int, proc) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(5)  # the sentinel fires as it exits; reap it
        _mark_dead(proc.pid, self._metrics_dir)
        if self._procs.get(index) is proc:
            del self._procs[index]
        how = describe_exit(proc.exitcode)
        if self._stopping:
            (logger.info if proc.exitcode == 0 else logger.warning)(
                "worker %d (pid %d) stopped (%s)", index, proc.pid, how)
            if not self._procs:
                self._all_exited.set()
            return
        if self._guard.record(time.monotonic()):
            logger.error("worker %d (pid %d) exited unexpectedly (%s); workers died %d "
                         "times within %.0fs: stopping the proxy (see the errors above)",
                         index, proc.pid, how, self._guard.limit, self._guard.window)
            self._exit_code = 1
            self._request_stop("crash loop")
            if not self._procs:
                self._all_exited.set()
            return
        logger.error("worker %d (pid %d) exited unexpectedly (%s); restarting it", index,
                     proc.pid, how)
        self._start(index)

    def _request_stop(self, why: str) -> None:
        if self._stopping:
            logger.info("%s: already stopping", why)
            return
        logger.info("%s: stopping %d workers (each drains up to %.0fs)", why,
                    len(self._procs), self.cfg.drain_timeout)
        self._stopping = True
        # No worker will be started again; once the draining workers closed
        # their copies too, new connections are refused, not left queued.
        self._close_listener()
        for proc in self._procs.values():
            _signal(proc, signal.SIGTERM)
        if not self._procs:
            self._all_exited.set()
        self._stop_requested.set()

    async def _stop_workers(self) -> None:
        limit = self.cfg.drain_timeout + KILL_GRACE_S
        try:
            await asyncio.wait_for(self._all_exited.wait(), limit)
        except asyncio.TimeoutError:
            for index, proc in list(self._procs.items()):
                logger.warning("worker %d (pid %d) still running %.0fs after SIGTERM; "
                               "killing it", index, proc.pid, limit)
                _signal(proc, signal.SIGKILL)
            try:
                await asyncio.wait_for(self._all_exited.wait(), 5)
            except asyncio.TimeoutError:
                logger.error("workers %s did not exit after SIGKILL",
                             sorted(p.pid for p in self._procs.values()))

    def _close_listener(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Its in-flight gauges no longer count; its counters still do."""
    try:
        from prometheus_client import multiprocess
    except ImportError:  # the workers' metrics are no-ops then
        return
    multiprocess.mark_process_dead(pid, metrics_dir)


def _signal(proc, sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
