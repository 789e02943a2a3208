"""
Run a model-written Python program with limits, for HumanEval's pass@1 (eval.py --bench humaneval).

Each program runs in its own process (`python -I`: no user site-packages, no PYTHON* variables) with
  * a wall-clock limit (the whole process group is killed when it overruns) and a CPU-time limit,
  * limits on address space (memory), processes, open files and the size of any file it writes,
  * a fresh temporary working directory, deleted afterwards, and a scrubbed environment (PATH, LANG only),
  * an audit hook, installed before the program runs, that refuses to open files for writing outside that
    directory and refuses process spawning, sockets and file deletion or renaming elsewhere.

This limits ACCIDENTS (an infinite loop, a memory hog, a stray file write), not a determined attacker: the
audit hook is Python-level and a program can reach the OS through ctypes or a C extension. Evaluate code from
models you do not trust inside a container or VM with no network (for example `docker run --network none`).
Resource limits need a POSIX system (Linux, macOS).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Written in front of every program. It runs inside the child, before the program, and cannot be removed
# from Python once added (sys.addaudithook has no "remove").
GUARD = r'''
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
def _inside(path):
    try:
        p = _os.path.realpath(_os.fsdecode(path) if not isinstance(path, int) else _ROOT)
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + _os.sep)
def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode and any(c in mode for c in "wax+")) or (flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT))
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")
    elif event in ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "shutil.rmtree", "os.utime"):
        paths = [a for a in args if isinstance(a, (str, bytes, _os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "os.kill", "os.killpg", "socket.connect", "socket.bind", "pty.spawn"):
        raise PermissionError(f"sandbox: {event} is not allowed")
_sys.addaudithook(_guard)
del _guard
'''


@dataclass
class Limits:
    seconds: float = 10.0          # wall clock, per program
    memory_mb: int = 1024          # address space
    processes: int = 64            # RLIMIT_NPROC counts all of the user's processes on Linux: not 1
    file_mb: int = 16              # the largest file it may write
    open_files: int = 64


@dataclass
class Result:
    status: str                    # "passed", "failed", "timeout"
    returncode: int | None
    seconds: float
    output: str                    # the tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _set_limits(limits: Limits):
    """Runs in the child between fork and exec (POSIX only)."""
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


def run_program(source: str, limits: Limits | None = None) -> Result:
    """Run `source` as a Python program under `limits`; 'passed' means it exited 0 within them."""
    if os.name != "posix":
        raise RuntimeError("sandbox.run_program needs a POSIX system (resource limits); use WSL or a container")
    limits = limits or Limits()
    workdir = tempfile.mkdtemp(prefix="alttrain-sandbox-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(GUARD + "\n" + source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: _set_limits(limits))
        try:
            out, _ = proc.communicate(timeout=limits.seconds)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            status = "timeout"
        # a CPU-limit kill (SIGXCPU/SIGKILL) before the wall clock ran out is a timeout too
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and status == "failed":
            status = "timeout"
        return Result(status, proc.returncode, round(time.time() - start, 3),
                      out.decode("utf-8", "replace")[-2000:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
    except (ProcessLookupError, PermissionError):
        proc.kill()
