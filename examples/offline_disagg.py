"""Offline prefill/decode disaggregation with vLLM's ``LLM`` class.

A producer process prefills the prompts (max_tokens=1) and hands each
request's ``kv_transfer_params`` to a consumer process, which loads the KV
from the producer and generates. The producer keeps its engine stepping
until the consumer is done, so it can serve the pulls and free its blocks.

Runs on a CPU with the tiny test model:

    python examples/offline_disagg.py            # builds ./demo-work/tiny-llama
    python examples/offline_disagg.py --model /path/to/model --kv-port 21000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os

PROMPTS = [
    "alpha beta gamma delta " * 10,
    "the prefill instance computes the cache and the decode instance " * 4,
    "one two three four five six seven eight nine ten " * 12,
]
LLM_ARGS = dict(enforce_eager=True, block_size=32, max_model_len=4096, dtype="float32", seed=0,
                distributed_executor_backend="uni")


def kv_transfer_config(role: str, kv_port: int) -> dict:
    return {
        "kv_connector": "AscendSimpleConnector",
        "kv_role": role,
        "kv_port": kv_port,
        "kv_connector_extra_config": {"kv_ip": "127.0.0.1"},
    }


def producer(model: str, kv_port: int, handoff: mp.Queue, done: mp.Event) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, kv_transfer_config=kv_transfer_config("kv_producer", kv_port), **LLM_ARGS)
    params = SamplingParams(temperature=0, max_tokens=1,
                            extra_args={"kv_transfer_params": {"do_remote_decode": True}})
    outputs = llm.generate(PROMPTS, params)
    handoff.put([o.kv_transfer_params for o in outputs])
    # Keep stepping: the leases are registered and served on later steps.
    while not done.is_set():
        llm.llm_engine.step()
        done.wait(0.005)


def consumer(model: str, kv_port: int, handoff: mp.Queue, done: mp.Event, results: mp.Queue) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, kv_transfer_config=kv_transfer_config("kv_consumer", kv_port),
              disable_log_stats=False, **LLM_ARGS)
    all_params = handoff.get(timeout=600)
    sampling = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, extra_args={"kv_transfer_params": p})
        for p in all_params
    ]
    outputs = llm.generate(PROMPTS, sampling)
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    results.put({
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "loaded_tokens": metrics.get("vllm:ascend_pd_loaded_tokens", 0),
    })
    done.set()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="")
    ap.add_argument("--kv-port", type=int, default=21000)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = args.model
    if not model:
        from vllm_ascend_pd.testing.tiny_model import build_tiny_model

        model = str(build_tiny_model("demo-work/tiny-llama"))
    ctx = mp.get_context("spawn")
    handoff, results, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=producer, args=(model, args.kv_port, handoff, done)),
        ctx.Process(target=consumer, args=(model, args.kv_port + 2, handoff, done, results)),
    ]
    for p in procs:
        p.start()
    try:
        result = results.get(timeout=900)
    finally:
        done.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    for prompt, toks in zip(PROMPTS, result["token_ids"]):
        print(json.dumps({"prompt": prompt[:40] + "...", "token_ids": toks}))
    # The consumer loaded every prompt token from the producer.
    print(json.dumps({"prompt_tokens": result["prompt_tokens"], "loaded_tokens": result["loaded_tokens"]}))
    return result


if __name__ == "__main__":
    main()
