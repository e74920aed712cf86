"""How the command-line tools end when the user asked for something that cannot be done: one line on
stderr, `error: <what is wrong and what to do>`, and exit status 2 (argparse's status for a usage
error), never a traceback. A traceback is reserved for a bug in tinyldm. `--debug` (any script) or
`TINYLDM_DEBUG=1` shows the traceback of a user error too.

What counts as the user's mistake, by exception type:
* `UsageError`: raised by tinyldm's own checks (a flag's value, a combination of flags, a memory
  estimate, a missing optional package);
* `SystemExit("message")` from code that is not tinyldm's (argparse, a third-party package);
* `CheckpointError`: a checkpoint that is missing, truncated, corrupt or of the wrong kind;
* `OSError` with a file name (a path that does not exist, cannot be written, a full disk);
* running out of memory, which names the flag that sizes the work.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEBUG_ENV = "TINYLDM_DEBUG"
USAGE_STATUS = 2

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else (--out)",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write somewhere else (--out)",
    errno.EACCES: "permission denied: choose a path you can write (--out) or read",
    errno.EPERM: "operation not permitted: choose another path",
    errno.EROFS: "the file system is read-only: write somewhere else (--out)",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "that is a folder, not a file: give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
}


class UsageError(SystemExit):
    """A mistake in what the user asked for: reported by `run` as one line, with exit status 2. A
    SystemExit, so that code which calls a tool's `main` without `run` still stops without a
    traceback."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt, or of the wrong kind (or
    one whose write failed). Defined here so that this module imports nothing from tinyldm; it is
    raised by `tinyldm.checkpoint` and `tinyldm.files`."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one change: a bad or missing flag raises `UsageError` (one line naming
    the flag and pointing at --help) instead of printing the usage block. `--debug` is accepted by
    every tool."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")

    def error(self, message: str):
        command = self.prog if self.prog.startswith("python") else f"python {self.prog}"
        raise UsageError(f"{message} ({command} --help lists the flags)")


def check_writable(path: str, flag: str) -> None:
    """Refuse an output path that cannot be written before the work that would fill it."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file name, e.g. {out / 'samples.png'}")
    folder = next((q for q in [out.parent, *out.parent.parents] if q.exists()), Path("."))
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is a file, so no folder can be made there")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: {folder} is not writable; choose another path")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an exception the user caused, or None for a bug."""
    if isinstance(exc, UsageError | CheckpointError):
        return one_line(exc)
    if isinstance(exc, SystemExit):
        return one_line(exc.code) if isinstance(exc.code, str) else None
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
    if oom and isinstance(exc, oom):
        return ("out of GPU memory: lower the batch size (--batch_size for training, --n or "
                "--height/--width for sampling) and run again; "
                + one_line(str(exc).split(".")[0]))
    if isinstance(exc, MemoryError):
        return ("out of memory: lower the batch size (--batch_size for training, --n or "
                "--height/--width for sampling) and run again")
    if isinstance(exc, OSError) and exc.filename is not None and exc.errno in _OS_HINTS:
        return f"{exc.filename}: {_OS_HINTS[exc.errno]} ({exc.strerror})"
    return None


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """main(argv), ending a user error with `error: ...` on stderr and exit status 2 (with the
    traceback first when --debug or TINYLDM_DEBUG=1 asks for it). Returns what main returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C outside a training loop, or a second one inside it
        if debug_requested(argv):
            traceback.print_exc()
        print(f"interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (Exception, SystemExit) as exc:
        message = user_message(exc)
        if message is None:
            raise
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_STATUS) from None
