"""Named points inside every write that a crash could interrupt, for fault-injection tests.

`point(name)` does nothing unless the environment asks for it:
- `LATENTKIT_FAULT_KILL=<name>:<n>` sends SIGKILL to this process the n-th time it passes `name`
  (a pre-emption at the worst moment: half a checkpoint, a shard without its record, ...);
- `LATENTKIT_FAULT_COUNT=<file>` appends every name passed to `file`, one per line, so a test can
  choose a point and an occurrence that a run really reaches.
The names: `atomic` (a temporary file or folder written, not yet renamed), `record` (a file renamed,
its size/hash record not yet written), `checkpoint` (training state saved, manifest not yet written),
`shard` (a store shard's arrays written, its done record not yet).
"""
from __future__ import annotations

import os
import signal

KILL_ENV = "LATENTKIT_FAULT_KILL"
COUNT_ENV = "LATENTKIT_FAULT_COUNT"
_passed: dict[str, int] = {}


def point(name: str) -> None:
    kill, count = os.environ.get(KILL_ENV), os.environ.get(COUNT_ENV)
    if not kill and not count:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if count:
        with open(count, "a") as f:
            f.write(name + "\n")
    if kill:
        target, _, n = kill.partition(":")
        if target == name and _passed[name] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
