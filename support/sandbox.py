"""
Run a model-written Python program in isolation, for HumanEval's pass@1 (eval.py --bench humaneval).

Isolation levels (`isolation()` picks the strongest this machine has, probed once per process):

    bwrap            bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) puts each program in its own
                     namespaces: no network (its own network namespace, loopback only), its own PID namespace
                     (everything it starts dies with it), a filesystem that shows only the system's programs and
                     libraries and this Python, read-only (no /etc, /home, /root, /work, /tmp), and a private
                     tmpfs at /sandbox (64 MiB) as the only writable place; no capabilities, --die-with-parent.
    fallback-nobody  no usable bwrap, running as root: the program runs as uid/gid 65534 (nobody), so the
                     kernel refuses writes to anything it does not own and RLIMIT_NPROC holds. It needs a Python
                     of this version that nobody can run: ours, or the system's python3.X (pyenv under /root is
                     not), which then runs the programs.
    fallback         no usable bwrap, not root (or root with no such Python): the program runs as this user.

At every level the program also runs with
  * a wall-clock limit (the whole process group is killed when it overruns) and a CPU-time limit,
  * limits on address space (memory), processes, open files and the size of any file it writes,
  * a fresh working directory, deleted afterwards, and a scrubbed environment (PATH, LANG, HOME, TMPDIR),
  * an audit hook (PEP 578), installed before the program runs, that refuses: writing, deleting or renaming
    outside the working directory; reading outside it and Python's own folders; processes, signals, sockets
    and name lookups; ctypes, subinterpreters and the C test modules; walking the garbage collector (where
    the hook could be found). It is written so that the program cannot reach it: its helpers are bound in a
    closure, not looked up in modules the program could patch.

What the fallbacks do NOT stop is in docs/sandbox.md: the audit hook is a Python-level check, and a way
around it (a C extension, a Python bug) leaves only the user's own permissions and the resource limits; as
nobody the program can still read world-readable files and write where anyone may (/tmp, /dev/shm), and
it has the host's network. For models you do not trust, install bubblewrap or run the whole evaluation in
a container with no network (`docker run --network none ...`). Resource limits need a POSIX system.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 65534  # uid and gid of `nobody` on Debian, Ubuntu, Fedora, Alpine
SANDBOX_DIR = "/sandbox"  # bwrap: the program's working directory, a tmpfs of its own (there is no /tmp)
LEVELS = ("bwrap", "fallback-nobody", "fallback")

# Modules whose import is refused: each reaches the OS or the interpreter's insides without an audit event
# that the hook could check (ctypes calls C directly; _posixsubprocess forks and execs; a subinterpreter has
# no hooks of its own; the _test* modules poke at internals).
BLOCKED_MODULES = ("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels",
                   "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase", "_ctypes_test",
                   "_cffi_backend", "cffi")

# Written in front of every program, with the folders it may read put in for __READABLE__. Everything the hook uses is
# bound in the closure of _alttrain_guard (C functions, builtins): the program cannot reach them by patching
# os.path, builtins or this module's globals, and a Python-level hook cannot be removed (no "remove" API).
GUARD = r'''
def _alttrain_guard(READABLE, BLOCKED):
    import sys, posix, _stat
    lstat, stat, readlink, getcwd, add_hook = posix.lstat, posix.stat, posix.readlink, posix.getcwd, sys.addaudithook
    islink, isdir = _stat.S_ISLNK, _stat.S_ISDIR
    Error, OSError_, str_, bytes_, int_, type_ = PermissionError, OSError, str, bytes, int, type
    HARMLESS = (type(None), int, float, bool, tuple)  # the other arguments of the events below (fds, modes, times)
    WRITE = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    ROOT = getcwd()
    DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    CHANGES = frozenset(("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link",
                         "os.truncate", "shutil.rmtree", "os.utime", "os.setxattr", "os.removexattr",
                         "os.chflags", "os.lchflags", "os.lchown", "os.mkfifo", "os.mknod"))
    # Symlinks are refused outright: a link whose target is judged from the wrong folder, swapped with another
    # by a second thread between this check and the open, would let a write through (a race on the path).
    REFUSED = frozenset(("os.symlink", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                         "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "webbrowser.open",
                         "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
                         "sys._current_frames", "cpython.PyInterpreterState_New"))

    def resolve(path, hops=0):
        # The absolute path with every symlink followed, computed with C functions only.
        if type_(path) is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for name in path.split("/"):
            if name == "" or name == ".":
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(name)
            here = "/" + "/".join(parts)
            try:
                mode = lstat(here).st_mode
            except OSError_:
                continue  # not there (yet): nothing to follow
            if islink(mode):
                if hops > 40:
                    raise Error("sandbox: too many symlinks")
                target = readlink(here)
                parent = "/" + "/".join(parts[:-1])
                resolved = resolve(target if target.startswith("/") else parent + "/" + target, hops + 1)
                parts = [p for p in resolved.split("/") if p]
        return "/" + "/".join(parts)

    def plain(path):
        # Only plain str/bytes paths are judged: a PathLike or a str subclass would run the program's code here.
        return type_(path) is str_ or type_(path) is bytes_

    def under(path, roots):
        p = resolve(path)
        for root in roots:
            if p == root or p.startswith(root + "/"):
                return True
        return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or type_(path) is int_:
                return  # an already-open file descriptor: its own open was checked
            if not plain(path):
                raise Error("sandbox: open() takes a plain str path here (not a Path or other object)")
            writing = (flags & WRITE) != 0
            if mode and type_(mode) is str_:
                for c in "wax+":
                    if c in mode:
                        writing = True
            if writing and not under(path, (ROOT,)):
                raise Error(f"sandbox: writing outside the working directory is not allowed: {path!r}")
            if not writing and not under(path, (ROOT,)):
                if not under(path, READABLE) and path not in DEVICES:
                    raise Error(f"sandbox: reading outside the working directory is not allowed: {path!r}")
                try:  # a folder's fd would let os.open(..., dir_fd=fd) create files there, unseen by this hook
                    folder = isdir(stat(path).st_mode)
                except OSError_:
                    folder = False
                if folder:
                    raise Error(f"sandbox: opening a folder outside the working directory is not allowed: {path!r}")
        elif event in CHANGES:
            for a in args:
                if plain(a):
                    if not under(a, (ROOT,)):
                        raise Error(f"sandbox: {event} outside the working directory is not allowed: {a!r}")
                elif type_(a) not in HARMLESS:
                    raise Error(f"sandbox: {event} takes plain str paths here (not a Path or other object)")
        elif event in REFUSED or event.startswith("socket.") or event.startswith("ctypes."):
            raise Error(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0] in BLOCKED:
            raise Error(f"sandbox: importing {args[0]} is not allowed")

    add_hook(hook)
_alttrain_guard(__READABLE__, frozenset(__BLOCKED__))
del _alttrain_guard
'''


@dataclass
class Limits:
    seconds: float = 10.0          # wall clock, per program
    memory_mb: int = 1024          # address space
    processes: int = 64            # RLIMIT_NPROC counts all of the user's processes on Linux: not 1
    file_mb: int = 16              # the largest file it may write
    open_files: int = 64
    disk_mb: int = 64              # bwrap: the size of its private working directory (tmpfs, in memory)


@dataclass
class Result:
    status: str                    # "passed", "failed", "timeout"
    returncode: int | None
    seconds: float
    output: str                    # the tail of stdout + stderr
    isolation: str = "fallback"    # the level it ran under (LEVELS)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# =====================================================================================================
# Which isolation this machine has (each probed once per process)
# =====================================================================================================
def _base_python() -> str:
    """The interpreter itself, not a venv's link to it: bwrap shows the sandbox its folder only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_folders(python: str) -> tuple[str, ...]:
    """Folders the interpreter reads its standard library (and, for ours, the venv) from: all the program
    may read besides its working directory, and under bwrap all it sees besides /usr."""
    if python == sys.executable:  # the fallback runs ours, venv included
        found = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    elif python == _base_python():  # bwrap runs the interpreter without the venv
        found = [sys.base_prefix, sys.base_exec_prefix]
    else:  # another install (the system's python3.X): its prefix is the folder above bin/
        found = [os.path.dirname(os.path.dirname(os.path.realpath(python)))]
    return tuple(dict.fromkeys(os.path.realpath(f) for f in found if f and os.path.realpath(f) != "/"))


def _bwrap_argv(bwrap: str, python: str, program: str, limits: Limits) -> list[str]:
    """bwrap's command line: new namespaces for everything, a read-only view of /usr and Python, a private
    tmpfs at SANDBOX_DIR holding the program (read-only) as the working directory."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "HOME", SANDBOX_DIR, "--setenv", "TMPDIR", SANDBOX_DIR, "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for folder in _python_folders(python):
        if not folder.startswith("/usr/"):
            argv += ["--ro-bind", folder, folder]
    inside = f"{SANDBOX_DIR}/program.py"
    return argv + ["--dev", "/dev", "--size", str(1 << 20), "--tmpfs", "/dev/shm",  # private and small
                   "--proc", "/proc", "--size", str(limits.disk_mb << 20), "--tmpfs", SANDBOX_DIR,
                   "--ro-bind", program, inside, "--remount-ro", "/",  # bwrap's own root tmpfs: read-only too
                   "--chdir", SANDBOX_DIR, python, "-I", "-B", inside]


@functools.lru_cache(maxsize=None)
def bwrap_problem() -> str | None:
    """None when bwrap runs programs here; else why not, in one line (its own error message when it
    exists but cannot make namespaces, as in some containers)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    workdir = tempfile.mkdtemp(prefix="alttrain-probe-")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w") as f:
            f.write("import hashlib, json, math\n")
        try:
            r = subprocess.run(_bwrap_argv(bwrap, _base_python(), program, Limits()), capture_output=True,
                               timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bwrap did not run: {type(e).__name__}: {e}"
        if r.returncode != 0:
            said = (r.stderr or r.stdout).decode("utf-8", "replace").strip().splitlines()
            return f"bwrap exists but fails here: {said[-1] if said else f'exit code {r.returncode}'}"
        return None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _drop_to_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@functools.lru_cache(maxsize=None)
def nobody_python() -> str | None:
    """An interpreter of this Python version that uid 65534 can run (as root, the fallback drops to it).
    A Python under /root (pyenv, conda) is unreadable to nobody, so the system's python3.X is tried next."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable, _base_python(), f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    check = f"import sys, hashlib, json, math; assert '%d.%d' % sys.version_info[:2] == '{version}'"
    for python in dict.fromkeys(candidates):
        if not os.path.isfile(python):
            continue
        try:
            r = subprocess.run([python, "-I", "-c", check], capture_output=True, timeout=30, cwd="/",
                               stdin=subprocess.DEVNULL, preexec_fn=_drop_to_nobody)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return python
    return None


def isolation() -> str:
    """The level run_program uses by default: bwrap where it works, else a fallback (module docstring)."""
    return available()[0]


def available() -> list[str]:
    """Every level this machine can run, strongest first (the tests attack each). As root, plain "fallback"
    runs the program as root: the default only where no Python is runnable by nobody."""
    return (["bwrap"] if bwrap_problem() is None else []) + \
        (["fallback-nobody"] if os.geteuid() == 0 and nobody_python() else []) + ["fallback"]


def describe(level: str | None = None) -> str:
    """One line for eval.py: the level, and what it stops or why the stronger one is missing."""
    level = level or isolation()
    if level == "bwrap":
        return ("bwrap: no network, own PID namespace, read-only view of /usr and Python only, a private "
                "working directory (tmpfs) the only writable place; "
                "resource limits and the audit hook as well")
    why = f" ({bwrap_problem()})"
    if level == "fallback-nobody":
        return (f"fallback, as uid {NOBODY} (nobody){why}: resource limits and an audit hook; it can still read "
                "world-readable files, write to /tmp and reach the network if it gets past the hook. For models "
                "you do not trust, install bubblewrap or use a container with --network none")
    user = "ROOT (no Python here that uid 65534 can run)" if os.geteuid() == 0 else "this user"
    return (f"fallback, as {user}{why}: resource limits and an audit hook; past the hook it can do anything "
            "this user can. For models you do not trust, install bubblewrap or use a container with --network none")


@functools.lru_cache(maxsize=None)
def announce() -> str:
    """Print once per process which isolation model-written code runs under; return the level."""
    print(f"sandbox: {describe()}")
    return isolation()


# =====================================================================================================
# Running one program
# =====================================================================================================
def _set_limits(limits: Limits, drop: bool):
    """Runs in the child between fork and exec (POSIX only): the limits, then (as root) nobody's uid."""
    import resource
    cpu = int(limits.seconds) + 1
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", limits.memory_mb << 20),
                        ("RLIMIT_NPROC", limits.processes), ("RLIMIT_FSIZE", limits.file_mb << 20),
                        ("RLIMIT_NOFILE", limits.open_files), ("RLIMIT_CORE", 0)):
        if hasattr(resource, name):
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass  # a limit the system will not lower this far (e.g. NPROC under some containers)
    if drop:
        _drop_to_nobody()


def run_program(source: str, limits: Limits | None = None, level: str | None = None,
                audit_hook: bool = True) -> Result:
    """Run `source` as a Python program under `limits`; 'passed' means it exited 0 within them.
    `level`: one of LEVELS (default: isolation()). `audit_hook=False` leaves the hook out; only the tests
    use it, to check that bwrap alone contains a program."""
    if os.name != "posix":
        raise RuntimeError("sandbox.run_program needs a POSIX system (resource limits); use WSL or a container")
    limits, level = limits or Limits(), level or isolation()
    if level not in LEVELS:
        raise ValueError(f"unknown isolation level {level!r} (one of {', '.join(LEVELS)})")
    if level == "bwrap" and bwrap_problem():
        raise RuntimeError(f"isolation 'bwrap' is not available here: {bwrap_problem()}")
    drop = level == "fallback-nobody"
    if drop and (os.geteuid() != 0 or nobody_python() is None):
        raise RuntimeError("isolation 'fallback-nobody' needs root and a Python that uid 65534 can run "
                           "(install python3 from the system's packages, or bubblewrap)")
    python = _base_python() if level == "bwrap" else nobody_python() if drop else sys.executable
    workdir = tempfile.mkdtemp(prefix="alttrain-sandbox-")
    try:
        path = os.path.join(workdir, "program.py")
        readable = _python_folders(python)
        guard = GUARD.replace("__READABLE__", repr(readable)).replace("__BLOCKED__", repr(BLOCKED_MODULES))
        with open(path, "w", encoding="utf-8") as f:
            f.write((guard if audit_hook else "") + "\n" + source)
        if level == "bwrap":
            argv, cwd, env = _bwrap_argv(shutil.which("bwrap"), python, path, limits), workdir, {}
        else:
            argv, cwd = [python, "-I", "-B", path], workdir
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            if drop:  # nobody must be able to write its working directory, and nothing else of ours
                os.chown(workdir, NOBODY, NOBODY)
                os.chown(path, NOBODY, NOBODY)
        # Output goes to a file, not a pipe: RLIMIT_FSIZE caps it, so a program printing without end cannot
        # fill this process's memory. Only its tail is kept.
        with tempfile.TemporaryFile() as log:
            start = time.time()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda: _set_limits(limits, drop))
            try:
                proc.wait(timeout=limits.seconds)
                status = "passed" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                status = "timeout"
            _kill_group(proc)  # anything it left running in its process group goes too
            log.seek(max(0, log.seek(0, os.SEEK_END) - 2000))
            out = log.read()
        # a CPU-limit kill (SIGXCPU/SIGKILL) before the wall clock ran out is a timeout too
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL) \
                and status == "failed":
            status = "timeout"
        return Result(status, proc.returncode, round(time.time() - start, 3),
                      out.decode("utf-8", "replace"), level)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.kill()
