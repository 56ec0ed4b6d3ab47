"""A ``--workers 2`` proxy in front of the cluster's P and D on real vLLM:
completions and chat, streaming and not, token-exact against the single
reference instance S, served by both workers; and a reduced soak."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_ascend_pd.testing.proxy_status import worker_statuses
from vllm_ascend_pd.testing.servers import ProxyServer, free_port
from vllm_ascend_pd.testing.soak import soak
from tests.e2e.helpers import post, prompt_of

pytestmark = pytest.mark.e2e

MAX_TOKENS = 10
EXTRA = {"temperature": 0, "ignore_eos": True, "return_token_ids": True, "model": "tiny",
         "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def workers_proxy(cluster):
    proxy = ProxyServer(free_port(), cluster.logs / "workers-proxy.log", "--workers", "2",
                        "--prefill", f"127.0.0.1:{cluster.P.port}",
                        "--decode", f"127.0.0.1:{cluster.D.port}")
    try:
        proxy.start(healthy=True)
        yield proxy
    finally:
        proxy.stop()


def stream(url: str, path: str, body: dict) -> tuple[str, list[int], str]:
    """Text, token ids and finish reason of an SSE answer."""
    req = urllib.request.Request(url + path, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    text, ids, finish = "", [], None
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
        done = False
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                break
            for c in json.loads(data)["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                ids += c.get("token_ids") or []
                finish = c.get("finish_reason") or finish
        assert done
    return text, ids, finish


def chat_body(i: int) -> dict:
    return {**EXTRA, "messages": [{"role": "user",
                                   "content": f"request {i}: alpha beta gamma delta " * 12}]}


def test_workers_proxy_token_exact(cluster, tokenizer, workers_proxy):
    url = workers_proxy.url
    pids = set(asyncio.run(worker_statuses(url, 2)))
    assert len(pids) == 2
    prompts = [prompt_of(tokenizer, n, seed=700 + n) for n in (40, 70, 130)]
    comp = [{**EXTRA, "prompt": p} for p in prompts]
    chats = [chat_body(i) for i in range(2)]

    def plain(path, body):
        return post(url, path, body)["choices"][0]

    def ref(path, body):
        return post(cluster.S.url, path, body)["choices"][0]

    jobs = ([("plain", "/v1/completions", b) for b in comp]
            + [("stream", "/v1/completions", b) for b in comp]
            + [("plain", "/v1/chat/completions", b) for b in chats]
            + [("stream", "/v1/chat/completions", b) for b in chats])
    expected = [ref(path, b) if kind == "plain" else stream(cluster.S.url, path, b)
                for kind, path, b in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: plain(j[1], j[2]) if j[0] == "plain"
                            else stream(url, j[1], j[2]), jobs))
    for (kind, path, _), want, have in zip(jobs, expected, got):
        chat = "chat" in path
        if kind == "plain":
            assert have.get("token_ids") == want.get("token_ids"), path
            assert have.get("text", have.get("message")) == want.get("text", want.get("message"))
            ids = have.get("token_ids")
            assert have["finish_reason"] == "length"
        else:
            assert have == want, path
            ids = have[1]
            assert have[2] == "length"
        if not chat:  # vLLM returns completion token ids in both forms
            assert len(ids) == MAX_TOKENS
    # Both workers are up and, together, sent every request to D.
    after = asyncio.run(worker_statuses(url, 2))
    assert set(after) == pids
    assert sum(st["instances"]["decode"][0]["requests_total"] for st in after.values()) \
        == len(jobs)


@pytest.mark.slow
def test_soak_through_workers(cluster, workers_proxy):
    """The reduced soak of test_soak.py through the --workers 2 proxy: nothing
    lost, nothing leaked on P or D, sampled answers exact, both workers busy."""
    before = asyncio.run(worker_statuses(workers_proxy.url, 2))
    report = asyncio.run(soak(
        workers_proxy.url, [cluster.P.url, cluster.D.url], requests=120, concurrency=48,
        abort_fraction=0.1, abort_window_s=2.0, reference_url=cluster.S.url,
        check_fraction=0.15, settle_timeout_s=30, seed=11,
    ))
    assert report.lost == 0, report.as_dict()
    assert report.leaks == {}, report.as_dict()
    assert report.completed + report.aborted == report.requests
    assert report.aborted > 0 and report.checked_exact > 0
    after = asyncio.run(worker_statuses(workers_proxy.url, 2))
    assert set(after) == set(before)
    served = {pid: st["instances"]["prefill"][0]["requests_total"]
              - before[pid]["instances"]["prefill"][0]["requests_total"]
              for pid, st in after.items()}
    assert all(n > 0 for n in served.values()), served
    assert after[next(iter(after))]["all_workers"]["inflight"] == 0
