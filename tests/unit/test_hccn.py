"""hccn.py: parsing real hccn_tool output and running a fake hccn_tool
(the real one ships with the Ascend driver, which this machine lacks)."""

from __future__ import annotations

import os
import stat

import pytest

from vllm_ascend_pd import hccn

# As printed by `hccn_tool -i 0 -ip -g` (one field per line) ...
MULTILINE = "ipaddr:192.168.100.101\nnetmask:255.255.255.0\n"
# ... and by some driver versions on one line.
ONE_LINE = "ipaddr:10.30.12.9 netmask:255.255.255.0"


@pytest.mark.parametrize("text, ip", [
    (MULTILINE, "192.168.100.101"),
    (ONE_LINE, "10.30.12.9"),
    ("ipaddr : 29.1.2.3\r\nnetmask : 255.255.0.0\r\n", "29.1.2.3"),
    ("netmask:255.255.255.0\n", None),
    ("ipaddr:\nnetmask:255.255.255.0\n", None),
    ("ipaddr:not-an-ip\n", None),
    ("", None),
])
def test_parse_ip(text, ip):
    assert hccn.parse_ip(text) == ip


def fake_tool(tmp_path, monkeypatch, script: str) -> None:
    """Put an executable `hccn_tool` first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "hccn_tool"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


ANSWERS = """
case "$2" in
  0) printf 'ipaddr:192.168.1.10\\nnetmask:255.255.255.0\\n' ;;
  1) printf 'ipaddr:192.168.1.11\\nnetmask:255.255.255.0\\n' ;;
  2) printf 'netmask:255.255.255.0\\n' ;;
  *) echo "device id $2 is invalid" >&2; exit 3 ;;
esac
[ "$3 $4" = "-ip -g" ] || exit 9
"""


def test_device_ips_from_fake_tool(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, ANSWERS)
    assert hccn.find_tool() == str(tmp_path / "bin" / "hccn_tool")
    assert hccn.device_ips([0, 1]) == {0: "192.168.1.10", 1: "192.168.1.11"}


def test_device_without_ip(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, ANSWERS)
    with pytest.raises(hccn.HccnError, match=r"device 2 has no IP address.*hccn_tool -i 2 -ip -s"):
        hccn.device_ip(2)


def test_tool_failure_names_exit_code_and_output(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, ANSWERS)
    with pytest.raises(hccn.HccnError, match=r"exit code 3: device id 7 is invalid"):
        hccn.device_ip(7)


def test_missing_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    monkeypatch.setattr(hccn, "DRIVER_TOOL", str(tmp_path / "absent" / "hccn_tool"))
    with pytest.raises(hccn.HccnError, match=r"hccn_tool not found.*driver/tools"):
        hccn.find_tool()
    with pytest.raises(hccn.HccnError, match="hccn_tool not found"):
        hccn.device_ip(0)
