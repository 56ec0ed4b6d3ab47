"""Start, watch and stop the processes of ``vllm-ascend-pd up``.

Every child runs in its own session (process group), so stopping it reaches
its engine and worker children, and a Ctrl-C in the terminal reaches only us:
we then stop exactly the groups we started, by their ids.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


# An exception line as Python prints it, also inside a vLLM ERROR log line:
# "ValueError: ...", "(EngineCore pid=7) ERROR 11-23 08:54:51 [core.py:1510] ValueError: ...".
_EXCEPTION = re.compile(
    r"^(?:\([^)]*\) )?(?:ERROR \S+ \S+ \[[^\]]*\] )?([A-Za-z_][\w.]*(?:Error|Exception): .+)$")


@dataclass
class Child:
    name: str
    argv: list[str]
    url: str  # base URL whose /health says "ready"
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    ready_after: float | None = None  # seconds from start
    log_start: int = 0  # this run's output begins here (the log is appended to)

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()
            self.proc = subprocess.Popen(
                self.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _lines(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def tail(self, n: int = 30) -> str:
        """The end of this run's log."""
        return "\n".join(self._lines()[-n:])

    def report(self, n: int = 30, causes: int = 3) -> str:
        """The end of this run's log, after the last few exception messages
        above it: vLLM logs why an engine failed to start, then a long
        traceback that ends in "See root cause above"."""
        lines = self._lines()
        found: list[str] = []
        for line in lines[:-n]:
            m = _EXCEPTION.match(line)
            if m and m.group(1) not in found:
                found.append(m.group(1))
        end = "\n".join(lines[-n:])
        found = [e for e in found if e not in end][-causes:]
        if not found:
            return end
        return "\n".join(["errors earlier in the log:", *found, "last lines of the log:", end])


def signal_groups(children: list[Child], sig: int) -> None:
    for c in children:
        if c.proc is not None and c.proc.poll() is None:
            try:
                os.killpg(c.proc.pid, sig)
            except ProcessLookupError:
                pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def group_alive(pgid: int) -> bool:
    if os.path.isdir("/proc/self"):
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_KILL_SETTLE_S = 5.0


def stop_all(children: list[Child], timeout_s: float = 30.0) -> list[str]:
    """SIGTERM every group we started, SIGKILL what is left after timeout_s.
    Returns the names that needed SIGKILL."""
    live = [c for c in children if c.proc is not None]
    signal_groups(live, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in live:
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    # Leaders gone, but engine/worker children of a group may linger.
    while time.monotonic() < deadline and any(group_alive(c.proc.pid) for c in live):
        time.sleep(0.2)
    killed = [c.name for c in live if group_alive(c.proc.pid)]
    for c in live:
        if group_alive(c.proc.pid):
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if c.proc.poll() is None:
            c.proc.wait(10)
    # SIGKILL is delivered asynchronously: on a loaded host a grandchild can
    # outlive killpg() by a moment, and "stopped" must mean gone.
    gone_by = time.monotonic() + _KILL_SETTLE_S
    while killed and time.monotonic() < gone_by and any(
            group_alive(c.proc.pid) for c in live):
        time.sleep(0.05)
    return killed
