"""Starting the proxy: "proxy ready" only once it listens, and a start that
fails (a taken --port or --register-port) closes what it had opened."""

from __future__ import annotations

import socket

import pytest

from vllm_ascend_pd.proxy.clients import BackendClients
from vllm_ascend_pd.proxy.config import ConfigError, ProxyConfig
from vllm_ascend_pd.proxy.server import ProxyServer


def _cfg(p, d, **kw):
    return ProxyConfig(prefill=[p.address], decode=[d.address], **kw)


def _ready_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "proxy ready" in r.getMessage()]


@pytest.fixture
def sessions(monkeypatch):
    """Every backend session the proxy opens."""
    made = []
    original = BackendClients.session

    def session(self, address):
        sess = original(self, address)
        if sess not in made:
            made.append(sess)
        return sess

    monkeypatch.setattr(BackendClients, "session", session)
    return made


@pytest.fixture
def taken():
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def test_ready_is_logged_once_listening(backend, release, caplog):
    p, d = await backend("p"), await backend("d")
    server = ProxyServer(_cfg(p, d, port=0, health_interval=0), release_transfer=release)
    with caplog.at_level("INFO"):
        await server.start()
    try:
        assert _ready_lines(caplog) == [
            f"proxy ready on http://127.0.0.1:{server.port}: 1 prefill, 1 decode, "
            "0 kv_both instances, policy round_robin"]
    finally:
        await server.shutdown()


async def test_a_taken_port_is_never_called_ready(backend, release, caplog, sessions, taken):
    # It logged "proxy ready: 1 prefill, ..." and then "cannot start the
    # proxy: ... address already in use".
    p, d = await backend("p"), await backend("d")
    server = ProxyServer(_cfg(p, d, port=taken, health_interval=3), release_transfer=release)
    with caplog.at_level("INFO"), pytest.raises(OSError, match="address already in use"):
        await server.start()
    assert _ready_lines(caplog) == []
    assert len(sessions) == 2 and all(s.closed for s in sessions)
    assert server.state.health._task is None


async def test_a_taken_register_port_closes_what_the_start_opened(backend, release, caplog,
                                                                  sessions, taken):
    # aiohttp skips on_cleanup when on_startup raises: the backend sessions
    # and the health task were left open ("Unclosed client session" at exit).
    p, d = await backend("p"), await backend("d")
    server = ProxyServer(_cfg(p, d, port=0, health_interval=3, register_port=taken),
                         release_transfer=release)
    with caplog.at_level("INFO"), pytest.raises(ConfigError, match="choose another --register-port"):
        await server.start()
    assert _ready_lines(caplog) == []
    assert len(sessions) == 2 and all(s.closed for s in sessions)
    assert server.state.health._task is None
