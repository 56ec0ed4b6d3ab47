"""Device (NIC) IP addresses of Ascend NPUs, read with CANN's ``hccn_tool``.

``hccn_tool -i <dev> -ip -g`` prints ``ipaddr:<ip>`` and ``netmask:<mask>``
(one per line, or both on one line on some driver versions). These are the
addresses HCCL / LLMDataDist links between prefill and decode NPUs use.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

# Where the Ascend driver installs the tool when it is not on PATH.
DRIVER_TOOL = "/usr/local/Ascend/driver/tools/hccn_tool"

_IPADDR = re.compile(r"\bipaddr\s*:\s*(\S+)")


class HccnError(RuntimeError):
    """hccn_tool is missing, failed, or printed no address."""


def find_tool() -> str:
    """Path of hccn_tool: PATH first, then the driver's tools directory."""
    path = shutil.which("hccn_tool")
    if path:
        return path
    if os.access(DRIVER_TOOL, os.X_OK):
        return DRIVER_TOOL
    raise HccnError(
        "hccn_tool not found on PATH nor at " + DRIVER_TOOL + ". It ships with the Ascend "
        "driver: install the driver, or add its tools directory to PATH "
        "(export PATH=$PATH:/usr/local/Ascend/driver/tools).")


def parse_ip(output: str) -> str | None:
    """The device IP in hccn_tool output, or None when it prints none."""
    for match in _IPADDR.finditer(output):
        try:
            return str(ipaddress.ip_address(match.group(1)))
        except ValueError:
            continue
    return None


def device_ip(device: int, *, tool: str | None = None, timeout_s: float = 10.0) -> str:
    """The IP of NPU ``device`` (a physical device id); raises HccnError."""
    tool = tool or find_tool()
    cmd = [tool, "-i", str(device), "-ip", "-g"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise HccnError(f"`{' '.join(cmd)}` did not answer within {timeout_s:.0f}s") from None
    except OSError as exc:
        raise HccnError(f"cannot run {tool}: {exc}") from None
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise HccnError(
            f"`{' '.join(cmd)}` failed with exit code {out.returncode}: {text.strip()[:300]}. "
            "Check the device id exists (npu-smi info) and that you may run hccn_tool (often root).")
    ip = parse_ip(text)
    if ip is None:
        raise HccnError(
            f"device {device} has no IP address (`{' '.join(cmd)}` printed {text.strip()[:200]!r}). "
            f"Configure it, e.g. hccn_tool -i {device} -ip -s address <ip> netmask <mask>, "
            "or see /etc/hccn.conf.")
    return ip


def device_ips(devices: list[int], *, tool: str | None = None) -> dict[int, str]:
    """IPs of several devices; raises HccnError at the first failure."""
    tool = tool or find_tool()
    return {d: device_ip(d, tool=tool) for d in devices}
