"""Reduced soak on the session cluster (the full run is benchmarks/soak.py):
200 requests at concurrency 64 through the proxy, a tenth of the clients
hanging up at random. Nothing lost, nothing leaked, sampled answers exact."""

from __future__ import annotations

import asyncio
import os

import pytest

from vllm_ascend_pd.testing.soak import soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_soak_reduced(cluster):
    report = asyncio.run(soak(
        cluster.proxy_url, [cluster.P.url, cluster.D.url],
        requests=int(os.environ.get("SOAK_REQUESTS", "200")), concurrency=64,
        abort_fraction=0.1, abort_window_s=2.0, reference_url=cluster.S.url, check_fraction=0.15,
        settle_timeout_s=30, seed=7,
    ))
    print(report.as_dict())
    assert report.lost == 0, report.as_dict()
    assert report.leaks == {}, report.as_dict()
    assert report.completed + report.aborted == report.requests
    assert report.aborted > 0 and report.checked_exact > 0
    assert report.settle_s < 15
