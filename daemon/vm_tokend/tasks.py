"""How many trio tasks this process runs: `status` and the proxy's health answer say it,
so a task that outlives its reason (a leak) shows from outside; `make soak` samples it.
"""

from __future__ import annotations

import trio

__all__ = ["count_tasks"]


def count_tasks() -> int:
    """Every task of the current run, the root and trio's own system tasks included.

    A walk of the task tree: microseconds for the few hundred tasks a busy daemon has, and
    only when a client asks (`status`, health), never on the token path."""
    root = trio.lowlevel.current_root_task()
    pending = [root] if root is not None else []
    count = 0
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count
