"""Run untrusted candidate code in a separate, limited process, never in the sftlab process.

Layers, each cheap:
- isolation: under bubblewrap (`bwrap`) where it works, a read-only root with only the temporary
  directory writable, its own PID namespace (nothing it starts outlives it) and no network; else
  `unshare` into PID and network namespaces (root may do so; others where user namespaces allow it);
  else only its own session. `isolation()` names the layer in use, and `sftlab eval` prints it;
- an unprivileged user: started by root (these machines and CI), the child drops to `nobody` before the
  candidate runs (so RLIMIT_NPROC applies and no file is root's to write). Under bubblewrap a Python
  installed under a private directory (/root, 0700) is bound into an empty, traversable copy of it;
  elsewhere the child stays root only when `nobody` could not run that Python, and says so;
- a fresh `python -I -B` in a temporary directory, with rlimits on CPU time, address space, file size,
  open files and processes, and a wall-clock timeout that kills it;
- an audit hook (PEP 578) that refuses writes outside the temporary directory, reads outside it and the
  Python installation, directories opened outside it (so no dir_fd can point elsewhere), fd-based
  chmod/chown/utime/truncate, sockets, subprocesses (`_posixsubprocess` included), native code, frame,
  gc and code-object introspection, and tracing. Its state lives in closures made before the candidate
  runs, so rebinding module globals or builtins does not reach it;
- the verdict: a pass needs exit status 0 *and* the run's secret, which the guard (given it on stdin,
  never in argv, env or a file) writes only after the candidate's last line (`check()`) returned: a
  candidate that exits early (`os._exit(0)`) fails. Only the tail of the output is read back.
It stops the mistakes model-written code makes and the known escapes of an audit-hook sandbox
(tests/evaluate/test_sandbox.py, run as root); bubblewrap is what makes it a jail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

OUTPUT_TAIL = 4096  # bytes of each stream read back

# Runs inside the child before the candidate: argv = guard.py candidate.py timeout memory_mb uid gid
# (uid -1: keep the user it was started as).
GUARD = r'''
def _main():
    import os, posix, resource, sys
    del globals()["_main"]
    secret = os.read(0, 256).strip()  # the verdict's secret, from the parent; stdin then closed
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    uid, gid = int(sys.argv[4]), int(sys.argv[5])
    if uid >= 0:  # root's last act: no supplementary groups, then the unprivileged ids, for good
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    timeout, memory_mb = float(sys.argv[2]), int(sys.argv[3])
    cpu = int(timeout) + 1
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 64)):
        resource.setrlimit(limit, (value, value))
    sys.addaudithook(_make_guard(posix.getcwd(), (sys.prefix, sys.base_prefix, sys.exec_prefix), posix.getpid(),
                                 secret, sys._getframe(), sys._getframe, posix.write))  # fmt: skip
    del secret  # from here only the hook's closure holds it; frames and the module hold no path to it
    source = open(sys.argv[1], encoding="utf-8").read()
    sys.argv = [sys.argv[1]]
    exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__"})
    for stream in (sys.stdout, sys.stderr):  # the candidate's output before the verdict
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- a stream the candidate closed or replaced
            pass
    sys.audit("sftlab.verdict")  # reached only when the candidate's last line returned


def _make_guard(cwd, prefixes, pid, secret, main_frame, getframe, write):
    # The hook uses only what is bound here, as closure variables: rebinding a module global (os's,
    # posixpath's) or a builtin cannot change what it decides, and it runs no candidate code (type() checks,
    # never isinstance or ==, which call methods an object may define).
    from posix import getcwd as posix_getcwd
    from posix import lstat, readlink
    type_, str_, bytes_, int_, OSError_, PermissionError_ = type, str, bytes, int, OSError, PermissionError
    WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND
    BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "os.chroot", "os.setuid", "urllib.",
               "gc.get_", "sys.settrace", "sys.setprofile", "resource.setrlimit", "cpython._PySys_ClearAuditHooks")
    PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
                   "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
                   "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2, "os.replace": 2}
    READ_EVENTS = ("os.listdir", "os.scandir")
    NATIVE = ("_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_testcapi", "_testinternalcapi")
    FUNCTION_PARTS = ("__code__", "__globals__", "__closure__", "__builtins__")

    def text(path):
        if type_(path) is bytes_:
            return path.decode("utf-8", "surrogateescape")
        if type_(path) is str_:
            return path
        refuse("a path of type " + type_(path).__name__)

    def resolve(path):
        # os.path.realpath(path) from the C functions bound here.
        path = text(path)
        if not path.startswith("/"):
            path = posix_getcwd() + "/" + path
        parts, out, hops = [p for p in path.split("/") if p and p != "."], [], 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                out = out[:-1]
                continue
            here = "/" + "/".join(out + [part])
            try:
                mode = lstat(here).st_mode
            except OSError_:  # not there (yet): taken as written
                mode = 0
            if mode & 0o170000 == 0o120000 and hops < 40:
                hops += 1
                target = readlink(here)
                out = [] if target.startswith("/") else out
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            out.append(part)
        return "/" + "/".join(out)

    root = resolve(cwd)
    readable = tuple(resolve(p) for p in prefixes)
    procs = ("/proc/" + str_(pid), "/proc/self")

    def under(real, top):
        return real == top or real.startswith(top + "/")

    def inside(path):
        return under(resolve(path), root)

    def is_dir(real):
        try:
            return lstat(real).st_mode & 0o170000 == 0o040000
        except OSError_:
            return False

    def may_read(path):
        real = resolve(path)
        if under(real, root):
            return True
        if is_dir(real):  # a directory fd outside would let dir_fd-relative calls reach anywhere
            return False
        if under(real, procs[0]) or under(real, procs[1]):
            return not real.endswith(("/mem", "/environ", "/map_files"))
        return real in ("/dev/null", "/dev/urandom") or any(under(real, top) for top in readable)

    def may_list(path):
        real = resolve(path)
        return under(real, root) or any(under(real, top) for top in readable)

    def refuse(what):
        raise PermissionError_("sandbox: " + what + " is not allowed")

    def guard(event, args):
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            if path is None or type_(path) is int_:
                return
            writes = (type_(mode) is str_ and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and not inside(path):
                refuse("writing outside the temporary directory: " + text(path))
            if not writes and not may_read(path):
                refuse("reading outside the temporary directory and the Python installation: " + text(path))
        elif event in PATH_EVENTS:
            for path in args[: PATH_EVENTS[event]]:
                if type_(path) is int_:
                    refuse(event + " on a file descriptor")
                if path is not None and not inside(path):
                    refuse(event + " outside the temporary directory: " + text(path))
        elif event in READ_EVENTS:  # listing (imports list the installation's directories), never opening
            if args and args[0] is not None and type_(args[0]) is not int_ and not may_list(args[0]):
                refuse(event + " outside the temporary directory: " + text(args[0]))
        elif event == "import":
            if args and type_(args[0]) is str_ and args[0].split(".")[0] in NATIVE:
                refuse("importing " + args[0])
        elif event == "object.__setattr__":
            if len(args) >= 2 and type_(args[1]) is str_ and args[1] in FUNCTION_PARTS:
                refuse("setting " + args[1])
        elif event == "sftlab.verdict":
            if getframe(1) is main_frame:  # the guard's own call after exec returned, not the candidate's
                write(1, b"\n" + secret + b"\n")
        elif event.startswith(BLOCKED):
            refuse(event)

    return guard


_main()
'''


@dataclass
class Outcome:
    status: str  # passed | failed | timeout
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    name: str  # bwrap | unshare | session
    description: str
    prefix: tuple[str, ...]  # the command that wraps the child (the temporary directory goes in as {dir})
    user: tuple[int, int] | None = None  # (uid, gid) the child drops to; None: it keeps the caller's

    @property
    def who(self) -> str:
        return f"runs as uid {self.user[0]}" if self.user else f"runs as uid {os.geteuid()}"


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The strongest isolation this machine runs: bubblewrap, else unshare, else a session of its own; as
    root, with the child dropping to an unprivileged user where that user can run this Python."""
    user = _unprivileged()
    bwrap = shutil.which("bwrap")
    if bwrap:
        base = (bwrap, "--ro-bind", "/", "/")
        tail = ("--dev", "/dev", "--proc", "/proc", "--bind", "{dir}", "{dir}", "--unshare-pid", "--unshare-net",
                "--die-with-parent", "--new-session", "--chdir", "{dir}")  # fmt: skip
        for cmd, as_user in (((*base, *_uncovered(_python_dirs()), *tail), user), ((*base, *tail), None)):
            if _works(cmd, as_user):
                iso = Isolation("bwrap", "", cmd, as_user)
                return replace(iso, description="bubblewrap: read-only root, only its temporary directory writable, "
                                                f"own PID namespace, no network, {iso.who}")  # fmt: skip
    unshare = shutil.which("unshare")
    if unshare:
        for cmd in ((unshare, "--pid", "--fork", "--kill-child", "--net"),
                    (unshare, "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--net")):
            for as_user in (user, None) if user else (None,):
                if _works(cmd, as_user):
                    iso = Isolation("unshare", "", cmd, as_user)
                    return replace(iso, description=f"unshare: own PID and network namespaces, {iso.who} (writes "
                                   "and reads limited by the audit hook only; install bubblewrap for a read-only "
                                   "root)")  # fmt: skip
    iso = Isolation("session", "", (), user if user and _works((), user) else None)
    return replace(iso, description=f"own session only, {iso.who} (no namespaces on this machine; install "
                                    "bubblewrap)")  # fmt: skip


def _unprivileged() -> tuple[int, int] | None:
    """(uid, gid) of `nobody` when this process is root (whose processes no RLIMIT_NPROC bounds), else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _python_dirs() -> list[str]:
    """The directories this Python runs from: its installation, the virtual environment, the executable's."""
    dirs = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(os.path.realpath(d) for d in dirs)


def _uncovered(paths: list[str]) -> list[str]:
    """bwrap arguments that let another user reach `paths` under a private directory (mode without o+x, such
    as /root): an empty tmpfs over the topmost private directory, traversable directories down to each path,
    each path bound read-only. Nothing else of the private directory is visible."""
    args, made, bound = [], set(), []
    for path in sorted(paths):  # a parent before what lies under it
        parts = path.strip("/").split("/")
        ancestors = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
        private = next((a for a in ancestors if not os.stat(a).st_mode & 0o001), None)
        if private is None or private == path or any(path.startswith(b + "/") for b in bound):
            continue
        for d in ancestors[ancestors.index(private) : -1]:
            if d not in made:
                made.add(d)
                args += ["--perms", "0755", "--tmpfs" if d == private else "--dir", d]
        args += ["--ro-bind", path, path]
        bound.append(path)
    return args


# What the probe runs: the drop the guard makes, then a stdlib import (the installation must stay readable).
_PROBE = "import os, sys\nif len(sys.argv) > 1:\n    os.setgroups([]); os.setresgid(*[int(sys.argv[2])] * 3); " \
         "os.setresuid(*[int(sys.argv[1])] * 3)\nimport json, decimal"  # fmt: skip


def _works(cmd: tuple[str, ...], user: tuple[int, int] | None) -> bool:
    with tempfile.TemporaryDirectory(prefix="sftlab-sandbox-probe-") as tmp:
        os.chmod(tmp, 0o755)
        ids = [str(user[0]), str(user[1])] if user else []
        try:
            run = subprocess.run([c.replace("{dir}", tmp) for c in cmd] + [sys.executable, "-I", "-c", _PROBE, *ids],
                                 capture_output=True, timeout=20, cwd=tmp, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
    return run.returncode == 0


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `code` as a script; it passes when its last line returned (the guard's secret follows it) and it
    exits 0, within `timeout` seconds."""
    secret = secrets.token_hex(16).encode()
    iso = isolation()
    with tempfile.TemporaryDirectory(prefix="sftlab-sandbox-") as outer:
        box, out, err = Path(outer) / "box", Path(outer) / "stdout", Path(outer) / "stderr"
        box.mkdir()
        (box / "candidate.py").write_text(code, encoding="utf-8")
        (box / "guard.py").write_text(GUARD, encoding="utf-8")
        uid, gid = iso.user or (-1, -1)
        if iso.user:  # the box is the dropped user's; the outer directory only traversable (not listable)
            os.chown(box, uid, gid)
            os.chmod(outer, 0o711)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(box), "TMPDIR": str(box), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        prefix = [c.replace("{dir}", str(box)) for c in iso.prefix]
        cmd = [*prefix, sys.executable, "-I", "-B", "guard.py", "candidate.py", str(timeout), str(memory_mb), str(uid),
               str(gid)]  # fmt: skip
        with open(out, "wb") as stdout, open(err, "wb") as stderr:  # files: the output cannot fill a pipe or RAM
            proc = subprocess.Popen(cmd, cwd=box, env=env, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                    start_new_session=True)  # fmt: skip
            try:
                proc.stdin.write(secret + b"\n")
                proc.stdin.close()
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return Outcome("timeout", f"still running after {timeout:g} s")
            except BrokenPipeError:  # the child died before reading its secret
                proc.wait(timeout=timeout)
            finally:
                _kill(proc)
        return _verdict(proc.returncode, _tail(out), _tail(err), secret)


def _tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
        return f.read()


def _verdict(returncode: int, out: bytes, err: bytes, secret: bytes) -> Outcome:
    if returncode == 0 and b"\n" + secret + b"\n" in out:
        return Outcome("passed")
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {returncode}"]
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome("timeout", f"CPU time limit ({tail[0]})")
    if returncode == 0:
        return Outcome("failed", "exited before its last line ran (no check() result)")
    return Outcome("failed", tail[0][:300])


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
