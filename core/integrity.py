"""Size and sha256 recorded when a file is written, checked before it is trusted.

A crash leaves a file either absent or whole (writes go through `core.checkpoint.atomic_path`), but a
disk, a copy or a network file system can still truncate it or flip bytes later. So every file a
long command resumes from (checkpoints, sample parts, feature-cache chunks) gets a record: for a
single file a sidecar `<name>.sha256.json`, written after the file; for a checkpoint folder a
`manifest.json` of all its files, written last. A file without its record counts as unfinished.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from core.errors import CorruptFileError

MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def write_recorded(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file; it is renamed onto `path` and then its record is written beside it."""
    from core import faults
    from core.checkpoint import atomic_path

    path = Path(path)
    _sidecar(path).unlink(missing_ok=True)  # an old record must never vouch for new bytes
    with atomic_path(path) as tmp:
        write(tmp)
        record = describe_file(tmp)
    faults.point("record")  # the file is in place, its record not yet: a reader treats it as unfinished
    with atomic_path(_sidecar(path)) as tmp:
        tmp.write_text(json.dumps(record))


def problem(path: str | Path) -> str | None:
    """None when `path` matches its record; else what is wrong (missing, no record, truncated, other bytes)."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    side = _sidecar(path)
    if not side.is_file():
        return f"{path} has no record of its size and hash (its write did not finish)"
    try:
        record = json.loads(side.read_text())
    except ValueError:
        return f"the record {side} is unreadable"
    return _compare(path, record)


def _compare(path: Path, record: dict[str, Any]) -> str | None:
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path} is {size} bytes, {record['bytes']} were written (truncated or appended to)"
    digest = sha256_file(path)
    if digest != record["sha256"]:
        return f"{path} has other bytes than were written (sha256 {digest[:16]}..., recorded {record['sha256'][:16]}...)"
    return None


def check(path: str | Path) -> Path:
    """`path`, after refusing it when it does not match its record."""
    if (why := problem(path)) is not None:
        raise CorruptFileError(why)
    return Path(path)


def write_manifest(folder: str | Path) -> None:
    """Record every file of a finished folder (a checkpoint) in `folder/manifest.json`."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): describe_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(files, indent=1))
    os.replace(tmp, folder / MANIFEST)


def folder_problems(folder: str | Path) -> list[str]:
    """What is wrong with a folder against its manifest: missing, truncated or changed files (empty: all good)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return [f"{folder / MANIFEST} is missing or unreadable"]
    out = []
    for name, record in files.items():
        path = folder / name
        why = _compare(path, record) if path.is_file() else f"{path} is missing"
        if why:
            out.append(why)
    return out
