"""A release that reaches the producer before the engine registered the
lease (the proxy releases as soon as P's answer arrives, and P registers
the lease at its next engine step) must still free it, not be refused and
leave the blocks leased until lease_s."""

from __future__ import annotations

import threading
import time

from kv_loopback import TID, make_cache, pumped, release_params, tcp_server
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kvclient import release_transfer_sync
from vllm_ascend_pd.testing.servers import free_port


def test_release_racing_ahead_of_lease_registration_frees_it():
    src = make_cache(1.0)
    port = free_port()
    leases = LeaseTable(60)
    server = tcp_server(src, port, leases, grace_s=2.0)
    params = release_params(port)
    registered = threading.Event()
    started = time.monotonic()

    def engine_step():
        if not registered.is_set() and time.monotonic() - started > 0.3:
            leases.register("req-p", TID, [3, 4])  # the engine's next step
            registered.set()

    try:
        with pumped(server, engine_step):
            assert release_transfer_sync(params, timeout=5) is True
            assert registered.is_set()
            assert leases.pending() == 0
            assert leases.take_finished() == {"req-p"}
            # An id that never gets registered is refused once the grace ends.
            t0 = time.monotonic()
            assert release_transfer_sync({**params, "transfer_id": "u" * 24}, timeout=5) is False
            assert 1.5 < time.monotonic() - t0 < 4
    finally:
        server.close()
