"""Summarise py-spy raw (collapsed) profiles written by ``--profile``:
where each worker process's Python threads spent their samples.

    python -m benchmarks.transfer.profile_summary /tmp/prof-after/*.txt
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path


def summarize(path: Path, top: int = 8) -> str:
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = frames[0].split(":")[-1].strip() if frames[0].startswith("thread") else "?"
        # The innermost frame of the connector/transport code, else the leaf.
        ours = [f for f in frames if "vllm_ascend_pd" in f or "transfer/run.py" in f]
        leaf[(thread, (ours[-1] if ours else frames[-1]).split(" (")[0])] += n
    lines = [f"{path.name}: {total} samples"]
    for (thread, fn), n in leaf.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {thread:12s} {fn}")
    return "\n".join(lines)


def main() -> None:
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))


if __name__ == "__main__":
    main()
