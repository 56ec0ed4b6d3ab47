"""Round-robin driver for transfer generators.

vLLM's CPU workers busy-poll for the next step with ``os.sched_yield``, which
starves any other Python thread of the GIL while the engine is busy; so all
connector I/O advances here, in small non-blocking steps, from the hooks vLLM
calls every engine step (and, while the engine is idle, from the worker's
idle servicer thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any


@dataclass
class Task:
    key: Any
    gen: Generator[bool, None, Any]
    on_done: Callable[[Any], None]
    on_error: Callable[[BaseException], None]
    owner: Any = None  # whose work this is, for ``cancel``


class Pump:
    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def add(self, task: Task) -> None:
        self.tasks.append(task)

    def run(self, budget_s: float) -> bool:
        """Advance every task until none can progress or ``budget_s`` is spent.

        Returns True when it stopped because every task is waiting on a peer
        (or none is left), False when the budget ran out with work ready:
        the caller may then wait for its peers' messages instead of polling."""
        deadline = time.perf_counter() + budget_s
        while self.tasks:
            progressed = False
            for task in list(self.tasks):
                try:
                    progressed |= next(task.gen) is not False
                except StopIteration as stop:
                    self.tasks.remove(task)
                    task.on_done(stop.value)
                    progressed = True
                except Exception as e:  # noqa: BLE001 - reported to the owner
                    self.tasks.remove(task)
                    task.on_error(e)
                    progressed = True
            if not progressed:
                return True
            if time.perf_counter() >= deadline:
                return False
        return True

    def cancel(self, owner: Any) -> list[Task]:
        """Stop ``owner``'s tasks without calling back (closing a generator
        runs its cleanup); returns them."""
        gone = [t for t in self.tasks if t.owner == owner]
        for task in gone:
            self.tasks.remove(task)
            task.gen.close()
        return gone

    def busy(self, key: Any) -> bool:
        return any(t.key == key for t in self.tasks)
