"""A node's trio tasks and where each one waits: what `clusterfs status --tasks`
shows, to see why a mount or lockd hangs (a demote that never ends, an operation
waiting for a lock) without stopping it. Python's own stack dumps (py-spy,
faulthandler) show only the thread running the event loop, not its tasks."""

from __future__ import annotations

import trio


def describe_tasks(limit: int = 4000) -> list[dict]:
    """Every task of the running trio loop (up to `limit`): its name and the chain of
    coroutine frames it is suspended in, innermost last."""
    out: list[dict] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo and len(out) < limit:
        task = todo.pop()
        frames = [f"{f.f_code.co_filename.rsplit('/clusterfs/', 1)[-1]}:{line} "
                  f"{f.f_code.co_name}" for f, line in task.iter_await_frames()]
        out.append({"name": task.name, "frames": frames})
        for nursery in task.child_nurseries:
            todo.extend(sorted(nursery.child_tasks, key=lambda t: t.name, reverse=True))
    return out
