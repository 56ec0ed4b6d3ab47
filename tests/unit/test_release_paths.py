"""The consumer frees a producer's lease as soon as it knows it will not
(or no longer) pull it, instead of leaving the blocks leased until
``lease_s``; and it can never free a lease it is not the consumer of: a
release names the prompt, and the producer frees only the lease of that
prompt (protocol 7)."""

from __future__ import annotations

import time

import pytest
import torch

from kv_loopback import TID, assert_copied, drive, make_cache, pump_for, pumped, release_params, tcp_puller, tcp_server
from vllm_ascend_pd.connector.metadata import RecvSpec, ReleaseSpec
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kvclient import release_transfer_sync
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions

SECRET = "s" * 32
H = release_params(1)["prompt_hash"]  # the prompt the lease holds
# A send waits this long for the consumer's data stream: the tests below
# must end the lease long before it.
OPT = TransportOptions(chunk_bytes=4096, pool_bytes=16384, idle_timeout_s=20)


@pytest.fixture(params=["", SECRET], ids=["open", "secret"])
def setup(request):
    secret = request.param
    src, dst = make_cache(1.0), make_cache(0.0)
    leases = LeaseTable(60)
    port = free_port()
    server_stats, stats = TransferStats(), TransferStats()
    server = tcp_server(src, port, leases, opt=OPT, stats=server_stats, secret=secret)
    puller = tcp_puller(dst, opt=OPT, stats=stats, secret=secret)
    yield src, dst, leases, server, puller, port, server_stats, secret
    server.close()
    puller.close()


def _until_freed(server, puller, leases, timeout=5.0) -> float:
    start = time.monotonic()
    while leases.pending() and time.monotonic() - start < timeout:
        pump_for(server, 0.005, puller)
    return time.monotonic() - start


def test_a_refused_pull_of_this_prompt_releases_the_lease(setup):
    src, dst, leases, server, puller, port, server_stats, _ = setup
    leases.register("req-p", TID, [1, 2], H)
    # Params of this prompt that P cannot serve (here: a block P did not lease).
    puller.submit(RecvSpec("d", "127.0.0.1", port, TID, "req-p", [1, 33], [5, 6], 64, prompt_hash=H))
    assert drive(server, puller) == ({"d"}, {"d"})
    assert _until_freed(server, puller, leases) < 2
    assert leases.pending() == 0 and leases.take_finished() == {"req-p"}
    assert server_stats.take()["releases"] == 1


def test_a_release_never_frees_another_prompts_or_requests_lease(setup):
    src, dst, leases, server, puller, port, server_stats, secret = setup
    leases.register("req-p", TID, [1, 2], H)
    for rid, ph in [("req-p", "b" * 32), ("req-p", ""), ("other", H)]:
        puller.submit(ReleaseSpec("d", "127.0.0.1", port, TID, rid, prompt_hash=ph))
    # Rebound params: D's prompt is another; P refuses the pull, and the
    # release that follows it.
    puller.submit(RecvSpec("x", "127.0.0.1", port, TID, "req-p", [1, 2], [5, 6], 64, prompt_hash="b" * 32))
    assert drive(server, puller) == ({"x"}, {"x"})
    pump_for(server, 0.5, puller)
    assert leases.pending() == 1
    assert server_stats.take()["releases"] == 0
    with pumped(server):  # the proxy's release names the prompt from P's answer
        assert release_transfer_sync({**release_params(port), "prompt_hash": "b" * 32}, secret=secret) is False
        assert leases.pending() == 1
        assert release_transfer_sync(release_params(port), secret=secret) is True
    assert leases.pending() == 0


def test_a_cancel_after_the_pull_was_granted_ends_the_send_at_once(setup):
    src, dst, leases, server, puller, port, server_stats, secret = setup
    leases.register("req-p", TID, [1, 2], H)
    puller.submit(RecvSpec("d", "127.0.0.1", port, TID, "req-p", [1, 2], [5, 6], 64, prompt_hash=H))
    deadline = time.monotonic() + 5
    while not server.sending() and time.monotonic() < deadline:
        puller.pump(0.0001)
        server.pump(0.0001)
    # P granted the pull and waits for D's data stream, which D never opened.
    assert server.sending()
    assert puller.transport._streams == {}  # noqa: SLF001 - the precondition
    with pumped(server):  # anyone else's release is refused: the pull is running
        assert release_transfer_sync(release_params(port), secret=secret) is False
    assert leases.pending() == 1
    puller.cancel("d")
    assert puller.take_results() == ({"d"}, set())
    took = _until_freed(server, puller, leases)
    assert leases.pending() == 0 and took < 2  # not transfer_timeout_s (20 s)
    assert not server.sending()
    data = server_stats.take()
    assert data["releases"] == 1 and data["failures"] == {}
    assert torch.count_nonzero(dst.tensors[0][[5, 6]]) == 0
    # The next pull is exact.
    leases.register("req-q", "q" * 24, [3, 4], H)
    puller.submit(RecvSpec("e", "127.0.0.1", port, "q" * 24, "req-q", [3, 4], [7, 8], 64, prompt_hash=H))
    assert drive(server, puller) == ({"e"}, set())
    assert_copied(src, dst, [3, 4], [7, 8])
