"""A release that reaches the producer before the engine registered the
lease (the proxy releases as soon as P's answer arrives, and P registers
the lease at its next engine step) must still free it, not be refused and
leave the blocks leased until lease_s."""

from __future__ import annotations

import threading
import time

from test_transport import TID, make_cache
from vllm_ascend_pd import protocol as wire
from vllm_ascend_pd.connector.kv_server import KVServer
from vllm_ascend_pd.connector.stats import TransferStats
from vllm_ascend_pd.connector.transfers import LeaseTable
from vllm_ascend_pd.kvclient import release_transfer_sync
from vllm_ascend_pd.params import prompt_hash
from vllm_ascend_pd.testing.servers import free_port
from vllm_ascend_pd.transport import TransportOptions, create_transport


def test_release_racing_ahead_of_lease_registration_frees_it():
    src = make_cache(1.0)
    port = free_port()
    leases = LeaseTable(60)
    server = KVServer(bind_host="127.0.0.1", port=port, engine_id="P", tp_rank=0, layout=src.describe(),
                      leases=leases,
                      transport=create_transport("tcp", src, TransportOptions(4096, 16384, 2)),
                      stats=TransferStats(), secret="", registration_grace_s=2.0)
    params = {"remote_engine_id": "P", "remote_host": "127.0.0.1", "remote_port": port,
              "remote_block_ids": [3, 4], "remote_request_id": "req-p", "transfer_id": TID,
              "tp_size": 1, "block_size": 32, "num_tokens": 40, "prompt_hash": prompt_hash([1]),
              "protocol": wire.PROTOCOL_VERSION}
    stop = threading.Event()
    registered = threading.Event()

    def engine():
        start = time.monotonic()
        while not stop.is_set():
            if not registered.is_set() and time.monotonic() - start > 0.3:
                leases.register("req-p", TID, [3, 4])  # the engine's next step
                registered.set()
            server.pump(0.01)
            time.sleep(0.005)

    t = threading.Thread(target=engine)
    t.start()
    try:
        assert release_transfer_sync(params, timeout=5) is True
        assert registered.is_set()
        assert leases.pending() == 0
        assert leases.take_finished() == {"req-p"}
        # An id that never gets registered is refused once the grace ends.
        start = time.monotonic()
        assert release_transfer_sync({**params, "transfer_id": "u" * 24}, timeout=5) is False
        assert 1.5 < time.monotonic() - start < 4
    finally:
        stop.set()
        t.join()
        server.close()
