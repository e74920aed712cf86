"""`RunLock` keeps two runs out of one output folder: `<out>/.lock` names the process that holds
it; a lock left by a process that no longer runs (killed) is taken over with a note.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..cli import UsageError


class RunLock:
    """`<folder>/.lock`: a kernel lock (`flock`) on that file, which also records the owner's pid,
    host, start time and command line.

    `acquire` refuses a folder whose lock another process holds (naming it from the file). The
    kernel drops the lock when its process ends, however it ends, so a lock left by a killed run is
    simply taken (with a note). A lock is taken only on the file the folder holds at that moment:
    the file's inode is checked after locking, so two runs can never both hold one. Re-entrant
    within one process (tests run several mains). `release`, or a normal exit, removes the file.
    """

    NAME = ".lock"
    _held: dict[str, tuple[int, int]] = {}  # path -> (fd, holds) in this process

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME

    @classmethod
    def for_rank_zero(cls, folder: str | os.PathLike) -> RunLock:
        """The lock of `folder`, taken by rank 0 of a torchrun job (or the only process); the other
        ranks hold an untaken one, whose `release` does nothing."""
        lock = cls(folder)
        return lock.acquire() if os.environ.get("RANK", "0") == "0" else lock

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        import fcntl

        key = str(self.path.resolve())
        if key in RunLock._held:
            fd, holds = RunLock._held[key]
            RunLock._held[key] = (fd, holds + 1)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                other = self.owner() or {}
                where = "" if other.get("host") in (None, socket.gethostname()) else \
                    f" on {other['host']}"
                raise UsageError(f"{self.path.parent} is in use by process {other.get('pid', '?')}"
                                 f"{where} (started {other.get('started', '?')}: "
                                 f"{other.get('command', '?')}); wait for it, stop it, or choose "
                                 "another --out") from None
            try:  # locked: but is it still the folder's lock file, or one unlinked meanwhile?
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            try:  # what a killed run left
                other = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
            except ValueError:
                other = None
            if isinstance(other, dict) and other.get("pid") != os.getpid():
                print(f"note: taking over {self.path} from process {other.get('pid')}, which no "
                      "longer runs")
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            RunLock._held[key] = (fd, 1)
            atexit.register(self.release)
            return self
        raise UsageError(f"could not take the lock {self.path}: other runs keep replacing it")

    def release(self) -> None:
        key = str(self.path.resolve())
        if key not in RunLock._held:
            return
        fd, holds = RunLock._held.pop(key)
        if holds > 1:
            RunLock._held[key] = (fd, holds - 1)
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody can take this file now
        os.close(fd)


