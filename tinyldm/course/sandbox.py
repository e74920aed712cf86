"""Where a student's code runs: a child process that reaches nothing of the grader's and leaves
nothing running.

The grader talks to it only through data (see probe.py). Two things decide how far it is shut in:

* who runs the grader. As root (Gradescope does), the child runs as an unprivileged user (uid
  SANDBOX_UID, no groups, no new privileges, at most 2048 processes): it can write nowhere the
  grader reads. As another user, it runs as that user.
* `isolation()`: "namespaces" where `unshare` can make them (as root; as another user, inside a
  user namespace, with no capabilities). The child gets its own PID, mount, network and IPC
  namespaces: no network, and killing its first process kills every process in it. Every folder in
  `hide` (the instructor's project) is covered by an empty tmpfs, and /tmp and /dev/shm are fresh
  tmpfs of their own (1 GiB at most). Elsewhere "reaper": the child runs under a reaper process, a
  subreaper that kills every descendant, orphans included, when the run ends; the folders in `hide`
  must then be unreadable to the child's user (`Child.start` refuses otherwise).

    child = Child(tree, isolation="namespaces", hide=[project])
    outputs = child.call("kl_term", {"mean": m, "logvar": v}, deadline=time.monotonic() + 60,
                         limit=60)  # starts the child on the first call
    child.close()  # every process it started is gone when this returns

Run as a script (`python -I sandbox.py SPEC`), this file is the first process of the sandbox: it
sets the sandbox up and then executes `python -m tinyldm.course.probe` in the tree. It imports
nothing from tinyldm.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SANDBOX_UID = SANDBOX_GID = 64055  # the unprivileged user a root grader runs student code as
TMPFS_SIZE = "1g"  # the child's /tmp: everything it writes lives there, and dies with it
MAX_REPLY = 256 * 2**20  # bytes
STARTUP_SECONDS = 120  # importing torch and the library


class ChildError(Exception):
    """No outputs: the student's code raised (fatal=False: the child lives on), or the child ran
    out of time, ended, or sent something that is not a reply (fatal=True: it must be killed)."""

    def __init__(self, message: str, fatal: bool = True):
        super().__init__(message)
        self.fatal = fatal


def _unshare_works(*flags: str) -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", *flags, "--pid", "--fork", "--kill-child", "--mount-proc",
                               "--net", "--ipc", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def isolation() -> str:
    """"namespaces" where this machine lets the grader make them, else "reaper"."""
    if sys.platform != "linux":
        raise RuntimeError("grading runs students' code in a Linux sandbox: grade on Linux (a "
                           "container or a virtual machine will do)")
    root = os.geteuid() == 0
    return "namespaces" if _unshare_works(*([] if root else ["--user", "--map-root-user"])) \
        else "reaper"


def readable_by_others(path: str | Path) -> bool:
    """Whether a user other than the owner can reach `path` (every folder above it passable)."""
    path = Path(path).resolve()
    for folder in [*reversed(path.parents), path]:
        mode = os.stat(folder).st_mode
        if not mode & 0o001 or (folder == path and not mode & 0o004):
            return False
    return True


def _python_dirs() -> list[str]:
    """The folders the child's Python needs: its installation and its site-packages."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).parent)}
    dirs |= {p for p in sys.path
             if p and Path(p).is_dir() and ("site-packages" in p or "dist-packages" in p)}
    return sorted({os.path.realpath(d) for d in dirs if Path(d).is_dir()})


def _child_env(home: str, threads: int | None) -> dict:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _processes() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Child:
    """A student's process: `tree` holds the library it imports; see the module docstring."""

    def __init__(self, tree: Path, *, isolation: str, hide: list[Path] = (),
                 threads: int | None = None, drop: bool | None = None,
                 userns: bool | None = None):
        """`drop`: run the student's code as SANDBOX_UID (default: when the grader is root);
        `userns`: make the namespaces inside a user namespace (default: when it is not). Only the
        kit's own tests change these."""
        if isolation not in ("namespaces", "reaper"):
            raise ValueError(f"isolation must be namespaces or reaper, got {isolation!r}")
        self.tree, self.mode, self.threads = Path(tree), isolation, threads
        self.root = os.geteuid() == 0 if drop is None else drop
        if self.root and os.geteuid() != 0:
            raise ValueError("only a grader running as root can run code as another user")
        self.userns = os.geteuid() != 0 if userns is None else userns
        self.hide = [str(Path(p).resolve()) for p in hide]
        self.proc: subprocess.Popen | None = None
        self.ns: str | None = None

    # -- life cycle --

    def start(self) -> None:
        """Start the child; `unshare` failing on its own before the child runs (a rare
        "sigprocmask unblock failed" when many start at once) is retried, twice."""
        for attempt in range(3):
            try:
                return self._start()
            except ChildError as e:
                own = self.mode == "namespaces" and "unshare: " in str(e) and attempt < 2
                if not own:
                    raise
                self.close()

    def _start(self) -> None:
        self._scratch = tempfile.mkdtemp(prefix="tmp")  # the child's home under a reaper
        if self.mode == "reaper" and self.root:
            os.chown(self._scratch, SANDBOX_UID, SANDBOX_GID)
            for path in [sys.executable, self.tree]:
                if not readable_by_others(path):
                    raise RuntimeError(f"the sandbox's user cannot read {path}: install Python and "
                                       "make the grading folder where every user can read them")
            for folder in self.hide:
                if readable_by_others(folder):
                    raise RuntimeError(f"{folder} is readable by every user: the student's code "
                                       f"could read it (chmod 700 {folder})")
        spec = {"mode": self.mode, "root": self.root, "userns": self.userns,
                "tree": str(self.tree), "hide": self.hide,
                "keep": _python_dirs(), "python": sys.executable, "uid": SANDBOX_UID,
                "gid": SANDBOX_GID,
                "env": _child_env("/tmp" if self.mode == "namespaces" else self._scratch,
                                  self.threads)}
        cmd = [sys.executable, "-I", str(Path(__file__).resolve()), json.dumps(spec)]
        if self.mode == "namespaces":
            cmd = ["unshare", *(["--user", "--map-root-user"] if spec["userns"] else []), "--pid",
                   "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", *cmd]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, start_new_session=True, close_fds=True,
                                     cwd="/")
        for f in (self.proc.stdin, self.proc.stdout):
            os.set_blocking(f.fileno(), False)
        deadline = time.monotonic() + STARTUP_SECONDS
        if self.mode == "namespaces":
            self.ns = self._find_namespace(deadline)
        if "ready" not in self._receive(deadline, STARTUP_SECONDS):
            raise ChildError("the process did not start")

    def _find_namespace(self, deadline: float) -> str | None:
        """The PID namespace of the child's first process (unshare's child)."""
        while time.monotonic() < deadline and self.proc.poll() is None:
            for pid in _processes():
                if _parent(pid) == self.proc.pid and (ns := _ns_of(pid)) != _ns_of(os.getpid()):
                    return ns
            time.sleep(0.02)
        return None

    def _members(self) -> list[int]:
        """Every process of the child's that is still there: in its PID namespace, or under a reaper
        the reaper itself (it exits only once it has no descendant left)."""
        if self.mode == "reaper":
            return [self.proc.pid] if self.proc.poll() is None else []
        return [pid for pid in _processes() if self.ns is not None and _ns_of(pid) == self.ns]

    def close(self) -> None:
        """Kill the child and everything it started; returns once none of it is left (or raises)."""
        if self.proc is None:
            return
        if self.mode == "reaper" and self.proc.poll() is None:
            self.proc.terminate()  # the reaper kills every descendant, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        else:
            self.proc.kill()  # unshare --kill-child: the namespace's first process dies, and all
        self.proc.wait()
        deadline = time.monotonic() + 30
        while left := self._members():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {left} of a student's run could not be killed")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        if self.mode == "reaper" and self.proc.returncode != 0:
            raise RuntimeError("the reaper of a student's run did not confirm that every process "
                               f"is gone (exit code {self.proc.returncode})")
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._stderr.close()
        self.proc = None

    # -- talking --

    def stderr_tail(self, chars: int = 2000) -> str:
        self._stderr.seek(0, 2)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - chars))
        return self._stderr.read().decode(errors="replace")

    def _ended(self) -> ChildError:
        lines = [line for line in self.stderr_tail().splitlines() if line.strip()]
        code = self.proc.poll()
        return ChildError(f"the process ended (exit code {code})"
                          + (f": {lines[-1][:300]}" if lines else ""))

    def _write(self, data: bytes, deadline: float, limit: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"ran past its {limit:.0f} s limit (an endless loop?)")
            if select.select([], [fd], [], left)[1]:
                try:
                    view = view[os.write(fd, view[:1 << 16]):]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    raise self._ended() from None

    def _read(self, n: int, deadline: float, limit: float) -> bytes:
        fd, chunks, got = self.proc.stdout.fileno(), [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"ran past its {limit:.0f} s limit (an endless loop?)")
            if select.select([fd], [], [], left)[0]:
                try:
                    chunk = os.read(fd, min(n - got, 1 << 20))
                except BlockingIOError:
                    continue
                if not chunk:
                    time.sleep(0.05)  # let the exit code arrive
                    raise self._ended()
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)

    def _receive(self, deadline: float, limit: float) -> dict:
        from tinyldm.course.probe import decode

        size = int.from_bytes(self._read(8, deadline, limit), "big")
        if size > MAX_REPLY:
            raise ChildError(f"sent a reply of {size} bytes (the limit is {MAX_REPLY})")
        data = self._read(size, deadline, limit)
        try:
            return decode(data, MAX_REPLY)
        except Exception as e:
            raise ChildError(f"sent back something that is not a reply ({e})"[:300]) from None

    def call(self, probe: str, inputs: dict, *, deadline: float, limit: float) -> dict:
        """The outputs of `probe` on `inputs`, or ChildError. `deadline` (time.monotonic()) bounds
        the whole exchange; `limit` is what a time-out's message names."""
        from tinyldm.course.probe import encode

        if self.proc is None:
            self.start()
        data = encode({"probe": probe, **inputs})
        self._write(len(data).to_bytes(8, "big") + data, deadline, limit)
        reply = self._receive(deadline, limit)
        if "error" in reply:
            raise ChildError(str(reply["error"]), fatal=False)
        return reply


# --- Inside the sandbox: runs as a script, before any student code --------------------------------

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 38, 24, 28
PR_SET_CHILD_SUBREAPER = 36
# SECBIT_NOROOT and SECBIT_NO_SETUID_FIXUP, each locked, and SECBIT_KEEP_CAPS_LOCKED
SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _cover(libc, folder: str, keep: list[str], mode: str) -> None:
    """Mount an empty tmpfs over `folder`, and bind the `keep` paths below it back in place."""
    kept = [(k, os.open(k, os.O_PATH)) for k in keep if _under(k, folder) and k != folder]
    options = f"mode={mode},size={TMPFS_SIZE}".encode()
    _check(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
           f"tmpfs on {folder}")
    for path, fd in kept:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC,
                          None), f"bind {path}")
        os.close(fd)


def _enter_namespace(spec: dict) -> None:
    libc = _libc()
    keep = [spec["tree"], *spec["keep"]]
    for folder in spec["hide"]:  # the instructor's project
        if os.path.isdir(folder):
            _cover(libc, folder, keep, "755")
    if spec["root"]:  # folders the unprivileged user could not pass through
        for path in spec["keep"]:
            parts = Path(path).parts
            for i in range(2, len(parts) + 1):
                folder = str(Path(*parts[:i]))
                if not os.stat(folder).st_mode & 0o001:
                    _cover(libc, folder, keep, "755")
                    break
    for folder in ("/tmp", "/dev/shm"):
        if os.path.isdir(folder):
            _cover(libc, folder, keep, "1777")
    if spec["userns"]:  # uid 0 of its own user namespace: keep no capability across exec
        _check(libc.prctl(PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0), "securebits")
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for cap in range(last + 1):
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop a capability")
    _become_the_student(libc, spec)


def _become_the_student(libc, spec: dict) -> None:
    """Limits, the unprivileged user (when root), no new privileges, then the probe."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**30, 2**30))
    if spec["root"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (2048, 2048))
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])  # this clears the parent-death signal: set it again
    if spec["mode"] == "namespaces":
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent death signal")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir(spec["tree"])
    os.execve(spec["python"], [spec["python"], "-m", "tinyldm.course.probe"], spec["env"])


def _reap(spec: dict) -> None:
    """Run the child under this process, a subreaper; on SIGTERM (or the grader's death) kill every
    descendant, orphans included, and exit 0 once none is left."""
    libc = _libc()
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "parent death signal")
    child = os.fork()
    if child == 0:
        os.setsid()
        _become_the_student(libc, spec)
    for fd in (0, 1):
        os.close(fd)

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            os.waitpid(-1, 0)
    except (ChildProcessError, Stop):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:  # kill until no descendant is left: orphans are re-parented to this process
        for pid in _processes():
            if _parent(pid) == os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            break
        time.sleep(0.01)
    os._exit(0)


def _main(spec: dict) -> None:
    if spec["mode"] == "reaper":
        _reap(spec)
    _enter_namespace(spec)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
