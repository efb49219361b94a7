"""What a recorded number depends on that no config holds: the version of this code, and where a file's
record of how it was made lies (``generators.sample`` writes one beside its samples, ``eval.gen`` reads it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    # --no-optional-locks: `status` must not take the index lock from someone committing in the same checkout.
    done = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args], capture_output=True, text=True,
                          timeout=30, check=True)
    return done.stdout.strip()


def code_version() -> dict[str, str | bool]:
    """``{"commit": <git HEAD>, "dirty": <uncommitted changes>}`` of this code's checkout; "unknown" for both
    when the code is not a git checkout of its own (an installed copy, no git program)."""
    try:
        # An installed copy inside someone else's repository must not report that repository's commit.
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != REPO:
            return {"commit": "unknown", "dirty": "unknown"}
        # Untracked files count as dirty: a new module can change a result as much as an edited one.
        return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}


def provenance_file(path: str | Path) -> Path:
    """The JSON record of how ``path`` was made: ``samples.npz`` -> ``samples.npz.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")
