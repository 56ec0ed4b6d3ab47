"""Host addresses as the connector, the announcer and the proxy write them.

Imports nothing beyond the standard library: the proxy uses it without vLLM.
"""

from __future__ import annotations


def host_port(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 host in brackets (``::1:8000`` is ambiguous);
    a host already in brackets is kept as it is."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
