"""The code sandbox against the escapes an audit-hook sandbox is known to fall to, run as this machine runs
(root here and in CI). Each candidate tries to write a file outside its directory, or to pass without
running its last line; each must fail, and the file must not appear."""

import os
import stat
import sys

import pytest

from sftlab.evaluate.sandbox import isolation, run_program


@pytest.fixture
def target(tmp_path):
    return tmp_path / "escaped.txt"


def refused(code: str, target) -> str:
    out = run_program(code, timeout=10)
    assert not out.passed, code
    assert not target.exists(), code
    return out.detail


def test_rebinding_the_hooks_globals_and_builtins_changes_nothing(target):
    code = f"""
import builtins, os, posixpath, sys
main = sys.modules['__main__']
for name in list(vars(main)):
    if not name.startswith('__'):
        setattr(main, name, None)
posixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd() + '/inside'
os.fsdecode = os.fspath = lambda p: 'inside'
builtins.isinstance = lambda *a: False
builtins.any = lambda *a: False
open({str(target)!r}, 'w').write('x')
"""
    assert "writing outside the temporary directory" in refused(code, target)


def test_the_hook_cannot_be_found_through_gc_or_have_its_code_replaced(target):
    assert "gc.get_objects" in refused("import gc\nhooks = [o for o in gc.get_objects() if callable(o)]", target)
    assert "gc.get_referrers" in refused("import gc, sys\ngc.get_referrers(sys)", target)
    code = f"def f(): pass\nf.__code__ = (lambda: 0).__code__\nopen({str(target)!r}, 'w')"
    assert "setting __code__" in refused(code, target)


def test_dir_fd_relative_and_fd_based_calls_do_not_reach_outside(target, tmp_path):
    dir_fd = f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n" \
             f"os.open('escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd)"  # fmt: skip
    assert "reading outside" in refused(dir_fd, target)
    prefix = "import os, sys\nfd = os.open(sys.prefix, os.O_RDONLY)\nos.open('x', os.O_CREAT | os.O_WRONLY, dir_fd=fd)"
    assert "reading outside" in refused(prefix, target)
    victim = os.path.join(sys.prefix, f"sandbox-victim-{os.getpid()}.txt")  # readable by the sandbox
    with open(victim, "w") as f:
        f.write("x")
    os.chmod(victim, 0o644)
    try:
        detail = refused(f"import os\nos.fchmod(os.open({victim!r}, os.O_RDONLY), 0o777)", target)
        assert "os.chmod on a file descriptor" in detail
        assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    finally:
        os.remove(victim)


def test_no_process_can_be_started_even_through_posixsubprocess(target):
    code = f"""
import _posixsubprocess, os
_posixsubprocess.fork_exec(['/usr/bin/touch', {str(target)!r}], [b'/usr/bin/touch'], True, (), None, None,
                           -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, None, None, None, -1, None, False)
"""
    assert "importing _posixsubprocess" in refused(code, target)
    assert not run_program(f"import subprocess; subprocess.run(['touch', {str(target)!r}])").passed
    assert not run_program(f"import os; os.system('touch {target}')").passed
    assert not target.exists()


def test_passing_needs_the_last_line_to_have_run(target):
    assert run_program("def check(f):\n    assert f(2) == 4\ncheck(lambda x: x * 2)").passed
    early = "import os\nos._exit(0)\ndef check(f):\n    assert False\ncheck(None)"
    assert "exited before its last line" in refused(early, target)
    forged = "import os, sys\nsys.audit('sftlab.verdict')\nos._exit(0)"
    assert "exited before its last line" in refused(forged, target)
    # Every string a frame holds printed: the secret is in none of them.
    frames = """
import os, sys
f = sys._getframe()
while f is not None:
    for v in [*f.f_locals.values(), *f.f_globals.values()]:
        if isinstance(v, (str, bytes)):
            print(v.decode() if isinstance(v, bytes) else v)
    f = f.f_back
sys.stdout.flush()
os._exit(0)
"""
    assert "exited before its last line" in refused(frames, target)


def test_reads_outside_the_directory_and_the_python_installation_are_refused(target):
    assert "reading outside" in refused("open('/etc/hostname').read()", target)
    assert "reading outside" in refused("open('/proc/self/mem', 'rb').read(1)", target)
    assert "os.listdir outside" in refused("import os; os.listdir('/etc')", target)
    code = "import json, os, sys\nopen(os.devnull).read()\nopen('/dev/urandom', 'rb').read(4)\nprint(os.listdir('.'))"
    assert run_program(code).passed  # the installation, /dev/null, /dev/urandom and its own directory


def test_output_is_bounded_and_the_isolation_is_named():
    assert run_program("print('x' * 2_000_000)").passed  # 2 MB of output, a 4 KiB tail read back
    huge = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)", timeout=20)
    assert not huge.passed  # stopped by the 16 MiB file-size limit, not by filling memory
    iso = isolation()
    assert iso.name in ("bwrap", "unshare", "session") and iso.description
    if os.geteuid() == 0:  # root here and in CI: namespaces are there (bwrap where installed)
        assert iso.name != "session"


@pytest.mark.skipif(os.geteuid() != 0, reason="the drop to an unprivileged user is what root's sandbox does")
def test_started_by_root_the_candidate_runs_as_an_unprivileged_user():
    iso = isolation()
    assert iso.user is not None and iso.user[0] != 0 and f"uid {iso.user[0]}" in iso.description
    uid, gid = iso.user
    code = (f"import os, json, decimal\nassert os.getuid() == os.geteuid() == {uid} and os.getgid() == {gid}\n"
            "assert os.getgroups() == []\nopen('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'")  # fmt: skip
    outcome = run_program(code)
    assert outcome.passed, outcome.detail
    assert not run_program("import os\nos.setuid(0)").passed  # no way back to root


def test_a_python_under_a_private_directory_is_bound_into_a_traversable_copy():
    import shutil
    import tempfile
    from pathlib import Path

    from sftlab.evaluate.sandbox import _uncovered

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # every ancestor traversable (pytest's tmp_path is under a 0700 one)
    base.chmod(0o755)
    private = base / "home"
    (private / "py" / "lib").mkdir(parents=True)
    (private / "other").mkdir()
    private.chmod(0o700)
    py, lib, pub = str(private / "py"), str(private / "py" / "lib"), str(base)
    args = _uncovered([lib, py, pub])
    assert args == ["--perms", "0755", "--tmpfs", str(private), "--ro-bind", py, py]  # lib lies under py; tmp is open
    deeper = _uncovered([lib])
    assert deeper == ["--perms", "0755", "--tmpfs", str(private), "--perms", "0755", "--dir", py, "--ro-bind", lib, lib]
    shutil.rmtree(base)
