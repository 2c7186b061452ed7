"""Run untrusted Python code (model completions) in a separate, limited subprocess.

    result = run_python("print(1 + 1)", timeout_s=5.0, memory_mb=512)
    result.passed, result.stdout          # True, "2\n"

What the child gets:
- its own process (never the trainer's), started as `python -I` (isolated mode: no user site-packages,
  no PYTHON* environment variables, the working directory not on sys.path), in a new session so that
  the whole process group can be killed;
- a fresh temporary directory as cwd, HOME and TMPDIR, removed afterwards;
- a minimal environment (PATH, HOME, TMPDIR, LANG): no proxy variables, no credentials from ours;
- limits set with `resource.setrlimit` before the user code runs: address space (RLIMIT_AS), CPU time
  (RLIMIT_CPU), size of any file written (RLIMIT_FSIZE, which also caps stdout/stderr) and no core
  dumps; soft and hard limits are equal, so the code cannot raise them again;
- a wall-clock timeout, after which the process group gets SIGKILL;
- stdout and stderr captured into files and cut to their head and tail, `max_output_chars` in all.

Network: before the user code runs, the child replaces `socket.socket`, `socket.create_connection`,
`socket.getaddrinfo` and related functions (in `socket` and `_socket`) with ones that raise
`PermissionError`. This is a BEST-EFFORT, IN-PROCESS block, NOT a kernel-level jail: code that calls
libc through `ctypes`, spawns another program (`curl`, a second Python) or re-creates the socket
module can still reach the network, and the filesystem outside the temporary directory stays
readable and writable with our user's rights. It stops a model that writes ordinary networking code;
it does not stop an adversary. For that, run the whole trainer (or this function's child) inside a
container or VM without network (e.g. `docker run --network none`, `unshare -rn`, nsjail, gVisor).
A side effect: `asyncio` event loops (which make a socketpair) do not work inside the sandbox.

Why the limits are set in the child's own bootstrap and not in a `preexec_fn`: `preexec_fn` forces
subprocess to use fork() instead of vfork/posix_spawn, which copies the page tables of the whole
parent (a trainer holding many GB) on every call, and Python documents it as unsafe when the parent
has threads (torch and tokenizers do). The bootstrap runs in the child, before any user code is
compiled, so the code runs under the same limits either way.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NETWORK_BLOCKED_MESSAGE = "network access is blocked in the onelayer_fast sandbox"

# Runs in the child as `python -I -c _BOOTSTRAP <memory_bytes> <cpu_seconds> <file_bytes>`, with the user
# code in ./solution.py. Kept free of f-string substitution so no user data ever becomes bootstrap code.
_BOOTSTRAP = r'''
import resource, sys

def _limit(kind, value):
    if value > 0:
        resource.setrlimit(kind, (value, value))

_memory, _cpu, _fsize = (int(v) for v in sys.argv[1:4])
_limit(resource.RLIMIT_AS, _memory)
_limit(resource.RLIMIT_CPU, _cpu)
_limit(resource.RLIMIT_FSIZE, _fsize)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

import socket, _socket
_MESSAGE = "%s"

def _blocked(*args, **kwargs):
    raise PermissionError(_MESSAGE)

class _BlockedSocket(socket.socket):
    # A subclass (not a function) so isinstance checks and subclasses in user code still work;
    # __init__ never calls the base __init__, so no file descriptor is ever opened.
    def __init__(self, *args, **kwargs):
        raise PermissionError(_MESSAGE)

    def __repr__(self):
        return "<blocked socket>"

for _module in (socket, _socket):
    for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "socketpair", "fromfd"):
        if hasattr(_module, _name):
            setattr(_module, _name, _blocked)
    _module.socket = _BlockedSocket
    _module.SocketType = _BlockedSocket

sys.argv = ["solution.py"]
with open("solution.py", encoding="utf-8") as _file:
    _source = _file.read()
_globals = {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}
del _file, _module, _name, _limit, _memory, _cpu, _fsize
exec(compile(_source, "solution.py", "exec"), _globals)
''' % NETWORK_BLOCKED_MESSAGE


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exited with status 0 within the time limit
    returncode: int  # negative: killed by that signal (e.g. -9 after a timeout)
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    reason: str  # "" when passed, else a one-line why: "timeout after 1.0 s", "network blocked", ...


def _read_truncated(path: str, max_chars: int) -> str:
    """The file's text, or, when longer than `max_chars`, its head and tail (a traceback or a final
    marker line sits at the end) around a note of how much was cut."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        if size <= max_chars:
            return file.read().decode("utf-8", errors="replace")
        head = file.read(max_chars - max_chars // 2)
        file.seek(size - max_chars // 2)
        tail = file.read()
    cut = size - len(head) - len(tail)
    return (
        head.decode("utf-8", errors="replace")
        + f"\n... [{cut} bytes of output truncated] ...\n"
        + tail.decode("utf-8", errors="replace")
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _reason(returncode: int, timed_out: bool, timeout_s: float, stderr: str) -> str:
    if timed_out:
        return f"timeout after {timeout_s:g} s (process group killed)"
    if returncode == 0:
        return ""
    if NETWORK_BLOCKED_MESSAGE in stderr:
        return "network blocked: " + _last_line(stderr)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file/output size limit)"}.get(name, "")
        return f"killed by {name}{why}"
    last = _last_line(stderr)
    if last.startswith("MemoryError"):
        return "memory limit: " + last
    return f"exit status {returncode}" + (f": {last}" if last else "")


def _remove_tree(path: str) -> None:
    """rmtree that first restores write permission the user code may have taken away."""
    def make_writable_and_retry(function, failed_path, _exc_info):
        try:
            os.chmod(os.path.dirname(failed_path) or failed_path, 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_time_s: float | None = None,
    max_output_chars: int = 10_000,
    max_file_mb: int = 16,
) -> SandboxResult:
    """Run `code` as a Python script in a limited child process; see the module docstring.

    timeout_s: wall-clock limit, after which the child's process group gets SIGKILL.
    memory_mb: address-space limit (RLIMIT_AS); an allocation beyond it raises MemoryError in the child.
    cpu_time_s: CPU-time limit (RLIMIT_CPU, whole seconds, rounded up); default ceil(timeout_s) + 1, a
        backstop that ends the child even if this process dies before the wall-clock timeout fires.
    max_output_chars: stdout and stderr are each cut to about this many bytes (head and tail kept).
    max_file_mb: largest file (including stdout/stderr) the child may write; beyond it, SIGXFSZ.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be > 0, got {timeout_s}, {memory_mb}")
    cpu_limit = math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s) + (1 if cpu_time_s is None else 0)
    workdir = tempfile.mkdtemp(prefix="olf-sandbox-")
    try:
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8", errors="surrogatepass") as file:
            file.write(code)
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
        }
        args = [
            sys.executable, "-I", "-c", _BOOTSTRAP,
            str(memory_mb * 2**20), str(max(1, cpu_limit)), str(max_file_mb * 2**20),
        ]
        stdout_path, stderr_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        start = time.perf_counter()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            process = subprocess.Popen(
                args, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also kills anything the code left running in the background (unless it escaped
                # with its own setsid: best effort, as the module docstring says). After a normal
                # exit the leader is already reaped; its pid cannot have been reused this quickly
                # (Linux hands out pids in sequence up to pid_max).
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
        duration = time.perf_counter() - start
        stdout = _read_truncated(stdout_path, max_output_chars)
        stderr = _read_truncated(stderr_path, max_output_chars)
        returncode = process.returncode
        return SandboxResult(
            passed=not timed_out and returncode == 0,
            returncode=returncode,
            timed_out=timed_out,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            reason=_reason(returncode, timed_out, timeout_s, stderr),
        )
    finally:
        _remove_tree(workdir)
