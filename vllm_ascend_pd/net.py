"""Host addresses as the connector, the announcer and the proxy write them,
and the one way a configured host name becomes an address.

A name is resolved here, once, at start-up, and only the resulting IP
address reaches sockets and ZMQ: otherwise each library would resolve it by
itself, with its own rules (ZMQ without its IPV6 option asks for IPv4 only,
and a name whose one address is ::1 silently binds 127.0.0.1), and the
address a producer binds could differ from the one it advertises.

Imports nothing beyond the standard library: the proxy uses it without vLLM.
"""

from __future__ import annotations

import ipaddress
import socket


class HostError(ValueError):
    """A configured host that names no usable address."""


def host_port(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 host in brackets (``::1:8000`` is ambiguous);
    a host already in brackets is kept as it is."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def unbracket(host: str) -> str:
    """``[::1]`` as sockets and the resolver take it: ``::1``."""
    return host.removeprefix("[").removesuffix("]")


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address (an IPv6 zone id such as ``%eth0`` allowed)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def family_of(address: str) -> socket.AddressFamily:
    """The socket family of an IP address."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def refuse_brackets(host: str, what: str) -> None:
    """Sockets take ``::1``, not ``[::1]``; say so rather than fail to resolve."""
    if host.startswith("["):
        raise HostError(f"{what} {host!r}: write an IPv6 address without brackets, "
                        f"e.g. {host.strip('[]')!r}")


def resolve(host: str, what: str) -> list[str]:
    """The addresses ``host`` names, the one to use first.

    An IP address is its own answer. For a name, the family comes from the
    system's resolver (getaddrinfo's first answer: RFC 6724 and
    /etc/gai.conf choose between IPv4 and IPv6); within that family the
    lowest address is used, so every process of an instance, resolving
    independently, picks the same one even when DNS rotates the order.
    ``what`` names the setting in the error, e.g. ``"kv_ip"``.
    Raises :class:`HostError` with the fix.
    """
    refuse_brackets(host, what)
    if is_ip(host):
        return [host]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise HostError(f"{what} {host!r} does not resolve to an address ({reason}): give "
                        "an IP address instead, or make the name resolve on this host "
                        "(/etc/hosts or DNS)") from None
    found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not found:  # getaddrinfo raises rather than answer nothing; be safe
        raise HostError(f"{what} {host!r} does not resolve to an address: give an IP address")
    family = family_of(found[0])
    chosen = min((a for a in found if family_of(a) == family), key=_sort_key)
    return [chosen, *(a for a in found if a != chosen)]


def _sort_key(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address)
