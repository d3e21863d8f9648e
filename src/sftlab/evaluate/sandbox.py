"""Run untrusted candidate code in a separate, limited process, never in the sftlab process.

Layers, each cheap: a fresh `python -I -B` in its own session and temporary directory; rlimits on
CPU time, address space, file size and open files; a wall-clock timeout that kills the process
group; a network namespace with no interfaces when unprivileged user namespaces are available; and
an audit hook (PEP 578) that refuses writes outside the temporary directory, sockets, subprocesses
and native-code loading. This stops the mistakes model-written code makes (loops, runaway memory,
stray files, network calls); it is not a jail for code written to escape one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Runs inside the child before the candidate; reads its limits from argv.
GUARD = r'''
import os, resource, sys
root = os.path.realpath(os.getcwd())
timeout, memory_mb = float(sys.argv[2]), int(sys.argv[3])
cpu = int(timeout) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "os.chroot", "os.setuid", "urllib.")
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
               "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
               "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2, "os.replace": 2}

def inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)

def guard(event, args):
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writes and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing outside the temporary directory is not allowed: {path}")
    elif event in PATH_EVENTS:
        for path in args[: PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"sandbox: {event} outside the temporary directory is not allowed: {path}")
    elif event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(guard)
del guard
source = open(sys.argv[1], encoding="utf-8").read()
sys.argv = [sys.argv[1]]
exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class Outcome:
    status: str  # passed | failed | timeout
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """`unshare` into an empty network namespace when this machine allows it unprivileged."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    cmd = (exe, "--user", "--map-root-user", "--net")
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return cmd if ok else ()


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `code` as a script; it passes when it exits 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="sftlab-sandbox-") as tmp:
        (Path(tmp) / "candidate.py").write_text(code, encoding="utf-8")
        (Path(tmp) / "guard.py").write_text(GUARD, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        cmd = [*_netns_prefix(), sys.executable, "-I", "-B", "guard.py", "candidate.py", str(timeout), str(memory_mb)]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Outcome("timeout", f"still running after {timeout:g} s")
        finally:
            _kill(proc)
    if proc.returncode == 0:
        return Outcome("passed")
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome("timeout", f"CPU time limit ({tail[0]})")
    return Outcome("failed", tail[0][:300])


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
