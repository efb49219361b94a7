"""The fault-injection helper: kill a command with SIGKILL at a random write point, rerun it, compare.

`kill_and_rerun(case, root)`:
1. runs the command uninterrupted in this process, counting the write points it passes
   (core.faults: `atomic`, `record`, `checkpoint`, `shard`);
2. runs it again in a subprocess (another out folder) that SIGKILLs itself at a random occurrence of a
   random point among those, and checks that it died by that signal;
3. runs the same command again (in this process: a fresh start, the dead process's lock is stale) and
   returns both results, which the caller compares bit for bit.
Both in-process runs and the subprocess use one thread, so floating-point reductions agree.
`LATENTKIT_FAULT_RUNS=N` repeats steps 2-3 N times (the 50-in-a-row check), each at a new random point; run it with
`-o timeout=0`, since N kills of one command outlast the suite's 600 s per-test limit.
"""
from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core import faults

REPO = Path(__file__).resolve().parents[1]

# Runs a command's main the way `python -m` does, after optional stand-ins (the 2048-d matrix square root of
# the Fréchet distance takes ~12 s here; the stand-in keeps a value that depends on every feature).
RUNNER = """
import importlib, sys
if sys.argv[1] == "cheap-frechet":
    import eval.metrics, eval.recon
    sys.path.insert(0, "tests")
    from fault_injection import cheap_frechet
    eval.metrics.frechet_distance = eval.recon.frechet_distance = cheap_frechet
from core import cli
cli.run(importlib.import_module(sys.argv[2]).main, sys.argv[3:])
"""


def cheap_frechet(mu1, s1, mu2, s2) -> float:
    import numpy as np

    return float(np.abs(mu1 - mu2).sum() + np.trace(s1) - np.trace(s2))


@dataclass
class Case:
    module: str  # e.g. "generators.train"
    argv: Callable[[Path], list[str]]  # the command line writing into a given folder
    result: Callable[[Path], Any]  # what must come out bit for bit the same (compared with ==)
    cheap_frechet: bool = False


def run_here(case: Case, out: Path, monkeypatch, count: Path | None = None) -> Any:
    import importlib

    with monkeypatch.context() as m:
        if count is not None:
            m.setenv(faults.COUNT_ENV, str(count))
        if case.cheap_frechet:
            import eval.metrics
            import eval.recon

            m.setattr(eval.metrics, "frechet_distance", cheap_frechet)
            m.setattr(eval.recon, "frechet_distance", cheap_frechet)
        importlib.import_module(case.module).main(case.argv(out))
    return case.result(out)


def run_killed(case: Case, out: Path, point: str, n: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", faults.KILL_ENV: f"{point}:{n}"}
    env.pop(faults.COUNT_ENV, None)
    cmd = [sys.executable, "-c", RUNNER, "cheap-frechet" if case.cheap_frechet else "-", case.module, *case.argv(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def kill_and_rerun(case: Case, root: Path, monkeypatch) -> None:
    """Steps 1-3 of the module docstring; asserts the rerun equals the uninterrupted run."""
    count = root / "points.txt"
    reference = run_here(case, root / "reference", monkeypatch, count)
    passed = collections.Counter(count.read_text().split())
    assert passed, f"{case.module} passed no write point"
    rng = random.Random()
    for attempt in range(int(os.environ.get("LATENTKIT_FAULT_RUNS", "1"))):
        point = rng.choice(sorted(passed))
        n = rng.randint(1, passed[point])
        out = root / f"killed_{attempt}"
        proc = run_killed(case, out, point, n)
        where = f"{case.module} killed at {point} #{n} of {passed[point]}"
        assert proc.returncode == -signal.SIGKILL, f"{where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        rerun = run_here(case, out, monkeypatch)
        assert rerun == reference, f"{where}: the rerun differs from an uninterrupted run"
        shutil.rmtree(out)  # fifty RAE runs keep ~25 GB otherwise; a failing one is kept to look at
