from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.request
from pathlib import Path


def log_dir(tmp_path_factory, name: str) -> Path:
    """$E2E_LOG_DIR when set (the logs outlive the run), else a fresh temporary folder."""
    logs = Path(os.environ.get("E2E_LOG_DIR") or tmp_path_factory.mktemp(name))
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def serve(deployment):
    """Body of a server fixture: ``yield from serve(d)`` starts ``d`` (its
    servers in parallel), hands it to the tests and always stops it, also
    when start-up fails half way."""
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def post(url: str, path: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"{name}{labels} not in /metrics of {url}")
    return total


def wait_for(pred, timeout: float = 30.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last={last!r})")


def prompt_of(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """A prompt of exactly ``n_tokens`` tokens, the same for the same (seed,
    n_tokens) and unrelated otherwise: instances are shared by every test, so
    two tests' prompts must not share a prefix block, or D's prefix cache
    would serve part of a prompt and the loaded-token counts would be off."""
    words = "alpha beta gamma delta prefill decode block cache tensor ascend".split()
    rng = random.Random(f"prompt-{seed}-{n_tokens}")
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(" " + rng.choice(words), add_special_tokens=False))
    return ids[:n_tokens]
