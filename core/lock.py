"""One writer per run folder, store or output: a lock file naming the process that holds it.

The holder refreshes the file's time every `HEARTBEAT` seconds from a background thread. Another
process refuses to start while the holder is alive, naming its pid and host. A lock is stale, and is
taken over with a warning, when its process is gone: on this host, when the pid no longer exists; on
any host (a pre-empted node), when it has not been refreshed for `STALE_AFTER` seconds.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

from core.errors import LockedError
from core.log import get_logger

log = get_logger("lock")
HEARTBEAT = 15.0
STALE_AFTER = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLock:
    """`with WriterLock(path, what):` or `acquire()`/`release()`; `path` is the lock file itself."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def _stale_reason(self, holder: dict, age: float) -> str | None:
        if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} is gone"
        if age > STALE_AFTER:
            return f"it has not been refreshed for {age:.0f} s"
        return None

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder, age = json.loads(self.path.read_text() or "{}"), time.time() - self.path.stat().st_mtime
                except (FileNotFoundError, ValueError):
                    holder, age = {}, STALE_AFTER + 1  # vanished or half-written: try again / stale
                if holder == {} and self.path.exists() and age <= STALE_AFTER:
                    time.sleep(0.2)  # another process is writing its lock right now
                    continue
                if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                    self.path.unlink(missing_ok=True)  # this process's own lock, from an earlier call: it cannot race itself
                    continue
                why = self._stale_reason(holder, age)
                if why is None:
                    raise LockedError(
                        f"{self.what} is being written by process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('since')}; lock {self.path}); wait for it to finish or stop it")
                log.warning("taking over the lock %s of process %s on %s: %s", self.path, holder.get("pid"),
                            holder.get("host"), why)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(body)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            atexit.register(self.release)
            return self
        raise LockedError(f"could not take the lock {self.path} of {self.what}: other processes keep taking it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
