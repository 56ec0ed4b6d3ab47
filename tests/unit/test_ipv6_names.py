"""A host name whose only address is ::1, resolved by the real system: as
kv_ip (a KV pull), proxy_ip (heartbeats) and the proxy's --register-host.

/etc/hosts stays untouched: the checks (ipv6_name_checks.py) run in a
private mount namespace (``unshare``) where a copy of it, with the name
added, is mounted over it. Skipped where that is not allowed or there is no
IPv6 loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ascend_pd.testing.servers import ipv6_loopback

NAME = "pd-ipv6-only.test"
HERE = Path(__file__).resolve().parent
# Mount the hosts file ($1) over /etc/hosts, then run the rest.
IN_NAMESPACE = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'


def _in_namespace(hosts: Path, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           IN_NAMESPACE, "sh", str(hosts), *argv],
                          capture_output=True, text=True, **kwargs)


@pytest.fixture
def hosts(tmp_path) -> Path:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    path = tmp_path / "hosts"
    path.write_text(Path("/etc/hosts").read_text() + f"\n::1 {NAME}\n")
    probe = _in_namespace(path, "getent", "ahosts", NAME, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /etc/hosts here: {probe.stderr.strip()}")
    return path


def test_a_name_of_only_ipv6_serves_kv_announces_and_registers(hosts):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    out = _in_namespace(hosts, sys.executable, str(HERE / "ipv6_name_checks.py"), NAME,
                        env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("all checks passed")
