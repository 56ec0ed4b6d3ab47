"""Host names for unit tests without touching /etc/hosts: a
``socket.getaddrinfo`` that answers some names with chosen addresses.

Only Python's resolver sees them, not C libraries such as libzmq: a test
that passes with these names also shows that nothing hands the name itself
to such a library. (test_ipv6_names.py resolves through the real system.)
"""

from __future__ import annotations

import socket


def fake_resolver(monkeypatch, names: dict[str, list[str]]) -> list[str]:
    """socket.getaddrinfo answering ``names`` in the given order (other hosts
    as usual); returns the list of names it was asked for."""
    real, asked = socket.getaddrinfo, []

    def fake(host, port, *args, **kwargs):
        if host in names:
            asked.append(host)
            return [info for address in names[host] for info in real(address, port, *args, **kwargs)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked
