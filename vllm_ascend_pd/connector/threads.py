"""Torch intra-op threads while the connector copies KV on the CPU.

On the CPU, torch runs a large copy (the gather into a staging buffer, the
scatter into the paged cache) as an OpenMP parallel region over every core.
The engine thread pumps transfers between model steps, while the peer
instance, ZMQ's I/O threads and the HTTP front ends want the same cores:
the parallel region then waits at its barrier for a worker thread that is
not running, burning CPU meanwhile. Measured with both instances on one
2-core host (docs/benchmarks.md, e2e): a 16 MiB pull took 35-115 ms with
torch's 2 threads and 6-13 ms with 1; gather CPU time went from 9-23 ms to
1.5-3 ms for the same bytes. A single-threaded memcpy already runs at
memory speed, so one thread costs nothing on an idle host either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# vLLM's CPU worker replaces torch.set_num_threads with a no-op (it guards
# its thread binding); the builtin underneath is what torch exports.
_set_num_threads = getattr(torch._C, "set_num_threads", torch.set_num_threads)


@contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """Run the body with one intra-op thread; restore the count after."""
    before = torch.get_num_threads() if enabled else 1
    if before == 1:
        yield
        return
    _set_num_threads(1)
    try:
        yield
    finally:
        _set_num_threads(before)
