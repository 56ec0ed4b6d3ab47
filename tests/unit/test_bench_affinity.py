"""The prefix-affinity benchmark's bookkeeping, on made-up phases (the real
run needs four vLLM instances and holds the heavy lock): pooled hit rates and
ratios, the answer comparison between policies, the workload's shape and the
hand-written reading surviving a re-run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("proxy/bench_affinity.py")


def _delta(bench, names=None, **per_instance):
    names = names or (*bench.PRODUCERS, *bench.CONSUMERS)
    out = {n: dict.fromkeys(bench.WATCH, 0.0) for n in names}
    for name, values in per_instance.items():
        out[name].update(values)
    return out


def _sample(bench, ttft_s: float, ids: list[int], error: str = ""):
    s = bench.Sample(start=10.0, ttft=ttft_s, end=10.0 + 2 * ttft_s, error=error)
    s.token_ids, s.text, s.tokens = list(ids), "".join(f"<{i}>" for i in ids), len(ids)
    return s


def _phases(bench):
    rr = bench.Phase("round_robin", 0, True, [_sample(bench, 0.4, [1, 2]), _sample(bench, 0.2, [3, 4])],
                     _delta(bench, P1={"queries": 1000, "hits": 200, "requests": 1},
                            P2={"queries": 1000, "hits": 0, "requests": 1},
                            D1={"queries": 1000, "hits": 100, "recv_bytes": 4e6, "requests": 2}), 3.0)
    aff = bench.Phase("prefix_affinity", 0, False,
                      [_sample(bench, 0.1, [1, 2]), _sample(bench, 0.1, [3, 5])],
                      _delta(bench, P1={"queries": 2000, "hits": 1500, "requests": 2},
                             D2={"queries": 2000, "hits": 1000, "recv_bytes": 1e6, "requests": 2}), 1.0)
    return [rr, aff]


def test_pooled_rates_and_ratios(bench):
    rr, aff = (bench.summarize([p]) for p in _phases(bench))
    assert rr["p_hit_rate"] == pytest.approx(0.1)
    assert rr["p_computed_tokens"] == 1800
    assert rr["d_hit_rate"] == pytest.approx(0.1)
    assert rr["split_p"] == {"P1": 1, "P2": 1} and rr["split_d"] == {"D1": 2, "D2": 0}
    assert aff["p_hit_rate"] == pytest.approx(0.75) and aff["d_hit_rate"] == pytest.approx(0.5)
    assert rr["ttft_mean_ms"] == pytest.approx(300) and aff["ttft_mean_ms"] == pytest.approx(100)
    q = bench.ratios(rr, aff)
    assert q["ttft_mean_ms"] == pytest.approx(1 / 3)
    assert q["pulled_mb"] == pytest.approx(0.25)
    assert q["p_computed_tokens"] == pytest.approx(500 / 1800)


def test_mismatches_compare_the_same_prompt_across_policies(bench):
    phases = _phases(bench)
    assert bench.mismatches(phases, 2) == (2, 1, 0)  # [3, 4] against [3, 5]
    phases[1].samples[1] = _sample(bench, 0.1, [3, 4, 6])
    assert bench.mismatches(phases, 2) == (2, 1, 1)
    phases[0].samples[1].error = "502: bad gateway"  # failed requests are not compared
    assert bench.mismatches(phases, 2) == (1, 0, 0)


def test_errors_are_counted_not_pooled(bench):
    p = _phases(bench)[0]
    p.samples.append(_sample(bench, float("nan"), [], error="boom"))
    s = bench.summarize([p])
    assert (s["requests"], s["errors"], s["first_error"]) == (3, 1, "boom")
    assert s["ttft_mean_ms"] == pytest.approx(300)


def test_workload_families_share_their_prefix_and_arrive_mixed(bench):
    wl = bench.make_workload(1, families=4, per_family=3, shared=64, suffix=(5, 9))
    assert len(wl.requests) == 12
    for fam, prompt in wl.requests:
        assert prompt[:64] == wl.families[fam] and 5 <= len(prompt) - 64 <= 9
    assert [f for f, _ in wl.requests] != sorted(f for f, _ in wl.requests)
    assert wl.key_room() == min(len(json.dumps(f)) - 1 for f in wl.families)
    # 4 families x 2 repeats x 64 cached tokens over all prompt tokens.
    assert wl.shared_ceiling() == pytest.approx(4 * 2 * 64 / wl.prompt_tokens)
    # Round robin over one instance is affinity; over 12 every request misses.
    assert wl.rotation_ceiling(1) == pytest.approx(wl.shared_ceiling())
    assert wl.rotation_ceiling(12) == 0


def test_rotation_ceiling_counts_the_instances_a_family_reaches(bench):
    wl = bench.Workload([[1] * 64, [2] * 64], [(0, [1] * 70), (0, [1] * 70), (1, [2] * 70),
                                               (0, [1] * 70), (1, [2] * 70), (1, [2] * 70)])
    # Over 2 instances: family 0 at 0, 1, 3 -> both; family 1 at 2, 4, 5 -> both.
    assert wl.rotation_ceiling(2) == pytest.approx(2 * 1 * 64 / 420)
    # Over 3: family 0 at 0, 1, 0 -> 2 instances; family 1 at 2, 1, 2 -> 2.
    assert wl.rotation_ceiling(3) == pytest.approx(2 * 1 * 64 / 420)
    assert wl.rotation_ceiling(4) == 0  # family 0 at 0, 1, 3; family 1 at 2, 0, 1


def test_report_keeps_the_hand_written_reading(bench):
    res = {"workload": bench.make_workload(1, 2, 2, 64, (5, 9)), "phases": _phases(bench),
           "salt_check": {"first": 0, "other_salt": 0, "same_salt": 128}, "startup_s": 60,
           "elapsed_s": 100}
    args = SimpleNamespace(argv=[], load_before="1 1 1", load_after="2 2 2", affinity_bytes=100,
                           load_factor=1.25, suffix_tokens=[5, 9], concurrency=2, max_tokens=2,
                           rounds=1)
    text = bench.markdown(res, args)
    # TTFT p50 100 against 200 ms, p99 100 against 400, mean 100 against 300.
    assert "| **affinity / round_robin** | | | **0.50** | 0.25 | **0.33** |" in text
    assert "`python benchmarks/proxy/bench_affinity.py` on" in text
    assert "**1 mismatches**" in text
    assert text.startswith("# Prefix-affinity benchmark\n")
    assert "two producers P1, P2 and two consumers D1, D2" in text
    assert "| requests P1 / P2 | requests D1 / D2 | spills P / D |" in text
    assert "producers: 1 GiB (`VLLM_CPU_KVCACHE_SPACE`), 8192 blocks" in text
    first = bench.with_reading(text, "")
    assert first.count(bench.HANDWRITTEN) == 1
    old = "# old report\n\n" + bench.HANDWRITTEN + "\n\nAffinity halves TTFT here.\n"
    again = bench.with_reading(text, old)
    assert again.startswith(text) and again.endswith("Affinity halves TTFT here.\n")
    assert "# old report" not in again


def test_more_producers_small_caches_and_spills(bench):
    """4P2D: the split has a column per instance, spills pool per leg, and a
    small cache is reported in blocks, tokens and families."""
    names = ("P1", "P2", "P3", "P4", "D1", "D2")
    phases = [
        bench.Phase("round_robin", 0, True, [_sample(bench, 0.2, [1, 2])],
                    _delta(bench, names, P1={"requests": 1}, P3={"requests": 3}, D2={"requests": 4}),
                    1.0, {"prefill": 0.0, "decode": 0.0}),
        bench.Phase("prefix_affinity", 0, False, [_sample(bench, 0.1, [1, 2])],
                    _delta(bench, names, P4={"requests": 4}, D1={"requests": 4}),
                    1.0, {"prefill": 3.0, "decode": 1.0}),
        bench.Phase("prefix_affinity", 1, True, [_sample(bench, 0.1, [1, 2])],
                    _delta(bench, names, P2={"requests": 4}, D1={"requests": 4}),
                    1.0, {"prefill": 2.0, "decode": 0.0}),
    ]
    aff = bench.summarize(phases[1:])
    assert aff["split_p"] == {"P1": 0, "P2": 4, "P3": 0, "P4": 4}
    assert aff["split_d"] == {"D1": 8, "D2": 0}
    assert aff["spills"] == {"prefill": 5.0, "decode": 1.0}
    assert bench.summarize(phases[:1])["spills"] == {"prefill": 0.0, "decode": 0.0}
    res = {"workload": bench.make_workload(1, 2, 2, 2048, (5, 9)), "phases": phases,
           "salt_check": {"first": 0, "other_salt": 0, "same_salt": 128}, "startup_s": 60,
           "elapsed_s": 100}
    args = SimpleNamespace(argv=[], load_before="1 1 1", load_after="2 2 2", affinity_bytes=100,
                           load_factor=1.25, suffix_tokens=[5, 9], concurrency=6, max_tokens=2,
                           rounds=2, producer_kv_blocks=256, consumer_kv_blocks=None)
    text = bench.markdown(res, args)
    assert text.startswith("# Prefix-affinity benchmark (4P2D)\n")
    assert "four producers P1, P2, P3, P4 and two consumers D1, D2" in text
    assert "over the same six instances" in text
    # 256 blocks of 32 tokens; a 2048-token family prefix is 64 blocks.
    assert "producers: 256 blocks (`--num-gpu-blocks-override 256`), 8192 tokens, the shared " \
           "prefixes of 4.0 families" in text
    assert "| requests P1 / P2 / P3 / P4 | requests D1 / D2 | spills P / D |" in text
    assert "| 0 / 4 / 0 / 4 | 8 / 0 | 5 / 1 |" in text  # pooled affinity row


def test_instance_counts_and_cache_sizes_are_checked(bench):
    assert bench.parse_args([]).producers == 2 and bench.parse_args([]).consumers == 2
    args = bench.parse_args(["--producers", "4", "--producer-kv-blocks", "256"])
    assert (args.producers, args.consumers, args.producer_kv_blocks) == (4, 2, 256)
    assert bench.instance_names(4, 2) == (("P1", "P2", "P3", "P4"), ("D1", "D2"))
    for bad in (["--producers", "0"], ["--producers", "6", "--consumers", "3"],
                ["--consumer-kv-blocks", "100"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
