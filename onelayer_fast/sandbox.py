"""Run untrusted Python code (model completions) in a kernel-isolated, limited child process.

    result = run_python("print(1 + 1)", timeout_s=5.0, memory_mb=512)
    result.passed, result.stdout          # True, "2\\n"
    run_python(solution, tests="assert f(1) == 2").passed   # the tests ran to their end (see below)
    backend()                             # "bwrap", "unshare" or "none": which isolation is in effect

Backends (the first that works on this machine is used; probed once per process and cached):

- "bwrap" (bubblewrap, `/usr/bin/bwrap`): the program runs in fresh namespaces. Network: a network
  namespace of its own with only a loopback device, so no packet (TCP, UDP, raw, DNS) can leave it,
  whatever API sends it (socket, _socket, ctypes, a second interpreter, an external program). PID: a
  PID namespace whose processes all die when the program's main process exits or is killed, including
  `setsid` and double-forked daemons; the program cannot see or signal any process outside it (the
  trainer included). Mount: a new, read-only root holding only /usr (and the /bin, /lib* links to it),
  the Python installation (its site-packages hidden under an empty read-only mount), a minimal /dev, a
  new /proc showing only the sandbox's own processes, and private, size-limited tmpfs mounts at /tmp
  (whose /tmp/olf-sandbox-work is the cwd, HOME and TMPDIR) and /dev/shm; the host's home, /etc, the
  checkout and every other path do not exist inside, and nothing written inside survives the run. IPC,
  UTS and cgroup namespaces are new too, the environment is empty (PATH, HOME, TMPDIR and LANG are
  set, bwrap adds PWD; bwrap itself starts with only PATH and LANG, so /proc/1/environ shows nothing of
  the trainer's), the program has no capabilities and no_new_privs is set. As root, the sandbox has
  no user namespace and the program runs as a uid of its own, random per run (so RLIMIT_NPROC, which the
  kernel ignores for host root, counts this run's processes only); as another user, it runs in a new user
  namespace (nested ones are disabled). Limits (below) bound memory, CPU, file size and the process
  count.
- "unshare" (util-linux, when bwrap is missing): the same namespaces, built by `unshare` and a short
  trusted Python setup step that mounts the same read-only root (binds remounted read-only, nosuid, with
  the same tmpfs mounts except /dev/shm), chroots into it, sets no_new_privs and, as root, switches to a
  uid of the run's own (else it empties the capability bounding set of the namespace's root). The same
  guarantees as bwrap, except that the cgroup namespace is the host's and that when the trainer itself
  dies the sandbox lives on until its CPU limit or its own end (bwrap's --die-with-parent has no
  equivalent there; `--kill-child` covers only unshare's own death).
- "none": neither works (no user namespaces, a container that forbids them, ...). The code task then
  refuses to run, unless the user opts in with the environment variable ONELAYER_FAST_UNSAFE_SANDBOX=1
  (or `allow_unsafe=True`), which names the risk: the old in-process, best-effort mode runs, with a
  warning. There, the program runs as the trainer's user, can read and write whatever that user can
  (home, the checkout, site-packages), can signal the trainer, can reach the network through anything
  but the `socket` functions the bootstrap replaces (ctypes, a second interpreter, an external program),
  and a `setsid` grandchild survives it; only the rlimits (without RLIMIT_NPROC, which would count all
  the user's processes), the pipes and the wall-clock kill of its process group hold, and in test mode
  the audit hook (below) is the only guard of the marker, /proc being the host's.

In every backend the trainer feeds the program through a pipe and reads its stdout and stderr through
pipes it owns, never through files the program could replace with a FIFO or a link: reading is bounded
in bytes (the head and tail of each stream are kept, `max_output_chars` in all, and the program is
killed once it has written `max_file_mb` MiB) and in time (`timeout_s`, after which the process group
gets SIGKILL; in a PID namespace that takes every process of the program with it). The limits are set
with `resource.setrlimit` by the child's bootstrap, before any user code is compiled: RLIMIT_AS
(memory), RLIMIT_CPU, RLIMIT_FSIZE (files), RLIMIT_NPROC (processes and threads) and no core dumps, soft
equal to hard so that the code cannot raise them. Why in the bootstrap and not through bwrap, prlimit or
a `preexec_fn`: RLIMIT_NPROC has to be set inside the new user namespace (or after the switch to the
run's own uid) to count only this run's processes, and bwrap has no rlimit options; a `preexec_fn`
forces subprocess to fork() instead of vfork/posix_spawn, which copies the page tables of the whole
trainer on every call and is unsafe when the parent has threads (torch and tokenizers do).

Tests (`tests=...`, what the code task uses): the solution and its tests travel through the stdin pipe
(never a file), are compiled as two separate code objects before any user code runs, and run, in a
thread, one after the other, the tests in a copy of the solution's globals with a pristine copy of the
builtins. A per-run secret marker, which also comes through the pipe, is written by the bootstrap's
main thread to a separate pipe only when the tests returned normally; `tests_passed` is whether the
trainer found it there. `sys.exit()`/`os._exit()` before the tests, or any exception, leave it unwritten.
The secret lives only in the memory of the same process as the solution, so it is kept out of reach:
in that mode /proc is not mounted at all (no /proc/self/mem or /proc/self/fd), nothing from the payload
is stored in a global, user code never runs in the main thread (so it cannot install signal handlers,
whose frame argument would lead there), and an audit hook (`sys.addaudithook`, which Python code
cannot remove) refuses frame access (sys._getframe, sys._current_frames, tracebacks' tb_frame,
generators' and coroutines' frames, settrace/setprofile), gc.get_objects/get_referrers/get_referents,
new audit hooks, ctypes (its import and every ctypes event), test and sub-interpreter extension
modules, starting programs (exec, posix_spawn, system, subprocess; so nothing can ptrace the process),
and opening or listing /proc/<pid>, /proc/self and /proc itself. What still gets through, because it is
not introspection: tests that check weakly (`assert f(x)` where any truthy value passes), results whose
`__eq__` is always True, a solution that monkeypatches state shared with the tests (modules in
sys.modules, attributes of imported modules, stdout); and what no audit hook can see: native code, such
as an extension module the program writes into its tmpfs (or loads directly through importlib's
machinery) and imports, could read the process memory. A program can always fail on purpose; it cannot
pass without its tests running to their end short of that native-code route.

Not contained in any backend: the program's CPU time up to its limits (a fork bomb is bounded by
RLIMIT_NPROC, each process by RLIMIT_CPU), the kernel memory of tmpfs inodes (bounded only by time), and
kernel vulnerabilities (namespaces share the host kernel: for hostile workloads at scale add a VM, gVisor
or a seccomp filter). Side effects: code can import only the standard library (site-packages is not
visible), and in test mode signal handlers cannot be installed and the traceback module cannot read
frames.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

NETWORK_BLOCKED_MESSAGE = "network access is blocked in the onelayer_fast sandbox"
UNSAFE_ENV = "ONELAYER_FAST_UNSAFE_SANDBOX"  # "1": run without kernel isolation when none is available
BACKENDS = ("bwrap", "unshare", "none")

_WORKDIR = "/tmp/olf-sandbox-work"  # the program's cwd, HOME and TMPDIR inside the namespace backends
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# As root, each run gets a uid from this range: RLIMIT_NPROC counts processes per uid, so a uid of the
# run's own makes the limit per run, and it owns nothing on the host.
_FIRST_UID, _UID_COUNT = 1_500_000_000, 100_000_000
_DRAIN_S = 0.5  # after the program's exit (or kill), how long output still in flight may take
_RESULT_BYTES = 256  # what is kept of the tests' completion pipe: the marker line fits many times


class SandboxUnavailableError(RuntimeError):
    """No kernel isolation works on this machine and the user did not opt in to the unsafe mode."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exited with status 0 within the time limit (and, with tests, they ran to their end)
    returncode: int  # negative: killed by that signal (-9 after a timeout; a namespace's 128+N exit reads -N)
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    reason: str  # "" when passed, else a one-line why: "timeout after 1.0 s", "memory limit: ...", ...
    tests_passed: bool | None = None  # None without tests; else whether the tests returned normally
    backend: str = ""  # "bwrap", "unshare" or "none"


# Runs in the child as `python -I -S -c _BOOTSTRAP <memory> <cpu s> <file bytes> <processes> <uid>
# <result fd> <block network>`, with the code (and tests and marker) on stdin. It never formats user
# data into code. Everything from the payload stays in function locals (never in this module's
# globals, which user code can reach as sys.modules["__main__"]).
_BOOTSTRAP = r'''
import os, resource, sys


def _limit(memory, cpu, fsize, nproc):
    for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                        (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc)):
        if value > 0:
            resource.setrlimit(kind, (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _become(uid):
    # Root outside (bwrap without a user namespace): switch to the run's own uid, which also clears
    # every capability; bwrap has set no_new_privs, so no later exec can gain any back.
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid):
        raise SystemExit("sandbox: could not drop privileges")


def _read_payload():
    def exact(size):
        parts = []
        while size:
            part = os.read(0, min(size, 1 << 20))
            if not part:
                raise SystemExit("sandbox: payload cut short")
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    header = exact(24)
    texts = [exact(int.from_bytes(header[i:i + 8], "little")).decode("utf-8", "surrogatepass")
             for i in (0, 8, 16)]
    null = os.open(os.devnull, os.O_RDONLY)  # the program's own stdin is empty, as before
    os.dup2(null, 0)
    os.close(null)
    return texts


def _block_network():
    # Only in the unsafe backend: an in-process, best-effort block (the namespaces need none).
    import socket, _socket
    message = "%s"

    def blocked(*args, **kwargs):
        raise PermissionError(message)

    class BlockedSocket(socket.socket):
        # A subclass so isinstance checks still work; __init__ never opens a file descriptor.
        def __init__(self, *args, **kwargs):
            raise PermissionError(message)

        def __repr__(self):
            return "<blocked socket>"

    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                     "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "socketpair", "fromfd"):
            if hasattr(module, name):
                setattr(module, name, blocked)
        module.socket = BlockedSocket
        module.SocketType = BlockedSocket


def _guard():
    # The audit hook of test mode: refuses the introspection routes that lead from user code to the
    # bootstrap's locals (the marker, the tests). Every function it calls is bound now, since user code
    # may replace builtins and module attributes later.
    # `types` reads a traceback's frame when imported (for types.FrameType): import it while allowed.
    import posixpath, _posixsubprocess, types  # noqa: F401

    class SandboxViolation(PermissionError, ValueError):
        # ValueError too: the standard library's optional frame look-ups (namedtuple, typing, enum,
        # logging) catch it and carry on without the frame.
        __qualname__ = "SandboxViolation"

    events = frozenset((
        "sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
        "sys.setprofile", "sys.addaudithook", "sys.monitoring.register_callback", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "cpython.PyInterpreterState_New", "os.exec",
        "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen"))
    modules = frozenset((
        "ctypes", "_ctypes", "_posixsubprocess", "_testcapi", "_testinternalcapi", "_testmultiphase",
        "_testsinglephase", "_testbuffer", "_testclinic", "_testimportmultiple", "_xxsubinterpreters",
        "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues"))
    frames = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    path_events = frozenset(("open", "os.chdir", "os.listdir", "os.scandir"))
    realpath, join, normpath, getcwd, fsdecode = (
        posixpath.realpath, posixpath.join, posixpath.normpath, os.getcwd, os.fsdecode)
    is_int, length, span, process_names = int, len, range, frozenset(("self", "thread-self"))

    def process_path(path):
        # /proc itself, or /proc/<pid>/..., /proc/self/...: as written (which catches dir_fd="/"
        # tricks) and resolved (which catches symbolic links and relative paths).
        if path is None or type(path) is is_int:
            return False
        text = fsdecode(path)
        for candidate in (normpath(text), realpath(join(getcwd(), text))):
            parts = candidate.split("/")
            if candidate.rstrip("/") == "/proc":
                return True
            for i in span(length(parts) - 1):
                if parts[i] == "proc" and (parts[i + 1].isdigit() or parts[i + 1] in process_names):
                    return True
        return False

    def hook(event, args):
        if event in events or event.startswith("ctypes."):
            raise SandboxViolation("blocked in the test sandbox: " + event)
        if event == "object.__getattr__" and args[1] in frames:
            raise SandboxViolation("blocked in the test sandbox: ." + args[1])
        if event == "import" and args[0].partition(".")[0] in modules:
            raise SandboxViolation("blocked in the test sandbox: import " + args[0])
        if event in path_events and args and process_path(args[0]):
            raise SandboxViolation("blocked in the test sandbox: " + event + " under /proc")

    def no_programs(*args, **kwargs):
        raise SandboxViolation("blocked in the test sandbox: starting a program")

    # subprocess keeps working as a module (asyncio imports it) but cannot start anything, also when
    # its C helper is called directly; importing that helper afresh is refused by the hook.
    _posixsubprocess.fork_exec = no_programs
    sys.addaudithook(hook)


def _run_user_code(solution_code, tests_code, namespace, clean_builtins, outcome, done, run, excepthook, system):
    # Runs in a thread of its own: user code never runs in the main thread, which holds the marker.
    # Only objects bound before any user code ran (arguments, not this module's globals, which user
    # code can change) are used to reach the verdict and to report it.
    try:
        try:
            run(solution_code, namespace)
            tests_namespace = namespace.copy()  # tests' own names stay out of the solution's globals
            tests_namespace["__builtins__"] = clean_builtins.copy()
            run(tests_code, tests_namespace)
            outcome[0] = True
        except SystemExit as error:
            system.stderr.write("sandbox: SystemExit(%%r) before the tests finished\n" %% (error.code,))
        except BaseException as error:
            excepthook(type(error), error, error.__traceback__)
    except BaseException:  # reporting failed (user code replaced stderr, ...): the verdict stands
        pass
    finally:
        try:
            for stream in (system.stdout, system.stderr):
                stream.flush()
        except BaseException:
            pass
        done.release()


def _harness(solution, tests, marker, result_fd):
    import _thread, builtins
    # Compiled before any user code runs, so nothing the solution does can change what the tests are.
    solution_code = compile(solution, "<solution>", "exec", dont_inherit=True, optimize=0)
    tests_code = compile(tests, "<tests>", "exec", dont_inherit=True, optimize=0)
    verdict = ("\n" + marker + "\n").encode()
    del solution, tests, marker
    clean_builtins = builtins.__dict__.copy()
    outcome, done, write, exit_now = [False], _thread.allocate_lock(), os.write, os._exit
    done.acquire()
    _guard()
    _thread.start_new_thread(
        _run_user_code,
        (solution_code, tests_code, {"__name__": "__main__", "__builtins__": builtins}, clean_builtins,
         outcome, done, exec, sys.__excepthook__, sys))
    del solution_code, tests_code, clean_builtins
    status = 1
    try:  # nothing here allocates or calls anything user code could have replaced
        done.acquire()
        if outcome[0] is True:
            write(result_fd, verdict)
            status = 0
    finally:
        exit_now(status)


def _main():
    memory, cpu, fsize, nproc, uid, result_fd, block = (int(value) for value in sys.argv[1:8])
    _limit(memory, cpu, fsize, nproc)
    if uid >= 0:
        _become(uid)
    solution, tests, marker = _read_payload()
    if block:
        _block_network()
    if result_fd >= 0:
        _harness(solution, tests, marker, result_fd)  # never returns
    # Plain mode: a script, as before (a file of its own in its private cwd, for traceback lines).
    with open("solution.py", "w", encoding="utf-8", errors="surrogatepass") as file:
        file.write(solution)
    sys.argv = ["solution.py"]
    return solution, {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__}


_source, _globals = _main()
del _limit, _become, _read_payload, _block_network, _guard, _run_user_code, _harness, _main
exec(compile(_source, "solution.py", "exec"), _globals)
''' % NETWORK_BLOCKED_MESSAGE

# Runs as `unshare ... -- python -I -S -c _UNSHARE_SETUP <spec json>`: (namespace) root builds the
# read-only root under spec["root"] (a host directory that only this mount namespace sees filled),
# chroots into it and starts the bootstrap as an unprivileged child. It stays as PID 1, reaping orphans
# and exiting with the child's status (128 + N for signal N, as bwrap does), so that the program is not
# PID 1 (which ignores unhandled signals, SIGXCPU included).
_UNSHARE_SETUP = r'''
import ctypes, json, os, sys

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
# Flags a bind mount in a user namespace must keep when remounted (the kernel locks them).
KEPT = ((os.ST_NOEXEC, NOEXEC), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))


def mount(source, target, fstype, flags, data=None):
    encode = lambda text: None if text is None else os.fsencode(text)
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, "mount %s: %s" % (target, os.strerror(error)))


def bind(source, target, read_only):
    if os.path.isdir(source):
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, BIND | REC)
    if read_only:
        kept = sum(flag for st_flag, flag in KEPT if os.statvfs(target).f_flag & st_flag)
        mount(None, target, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | kept)


os.umask(0o022)
mount(None, "/", None, REC | PRIVATE)
root = spec["root"]
mount("olf-root", root, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
for path in spec["read_only"]:
    bind(path, root + path, True)
for target, path in spec["symlinks"]:
    os.symlink(target, root + path)
for path in spec["hidden"]:
    mount("olf-hidden", root + path, "tmpfs", RDONLY | NOSUID | NODEV, "size=4k")
for name in ("null", "zero", "full", "random", "urandom"):
    bind("/dev/" + name, root + "/dev/" + name, False)
os.makedirs(root + "/tmp")
mount("olf-tmp", root + "/tmp", "tmpfs", NOSUID | NODEV, "mode=1777,size=%d" % spec["tmp_bytes"])
os.mkdir(root + spec["workdir"])
os.chmod(root + spec["workdir"], 0o777)
if spec["proc"]:
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
mount(None, root, None, REMOUNT | RDONLY | NOSUID | NODEV)
os.chroot(root)
os.chdir(spec["workdir"])
child = os.fork()
if child == 0:
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid or file-capability gains
        os._exit(126)
    uid = spec["uid"]
    if uid >= 0:  # real root: the run's own uid, which clears every capability
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:  # root of a user namespace: an empty bounding set, so exec grants no capability
        cap = 0
        while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP, EINVAL past the last one
            cap += 1
    os.execve(spec["argv"][0], spec["argv"], spec["env"])
while True:
    pid, status = os.wait()
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
'''


# ------------------------------------------------------------------------------------------ backends

_probe_lock = threading.Lock()
_probed: dict[str, bool] = {}
_probe_errors: dict[str, str] = {}
_warned_unsafe = False


def _interpreter() -> str:
    """The real interpreter (a venv's python is a link to it plus a pyvenv.cfg the sandbox lacks)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _layout() -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(read-only directories to bind, (target, link) symlinks, directories to hide) of the new root:
    /usr and its /bin, /lib* links (libc, external programs), the Python installation, nothing else."""
    read_only: list[str] = []
    symlinks: list[tuple[str, str]] = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            symlinks.append((os.readlink(top), top))
        elif os.path.isdir(top):
            read_only.append(top)
    prefix = os.path.realpath(sys.base_prefix)
    for extra in (prefix, os.path.dirname(_interpreter())):
        if not _covered(extra, read_only):
            read_only.append(extra)
    names = {"base": prefix, "platbase": prefix, "installed_base": prefix, "installed_platbase": prefix}
    paths = sysconfig.get_paths(vars=names)
    hidden = sorted({os.path.realpath(paths[key]) for key in ("purelib", "platlib")})
    hidden = [path for path in hidden if os.path.isdir(path) and _covered(path, [prefix])]
    return read_only, symlinks, hidden


def _tmp_bytes(max_file_bytes: int) -> int:
    return max(64 * 2**20, 4 * max_file_bytes)


def _bwrap_command(uid: int, with_proc: bool, max_file_bytes: int) -> list[str]:
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    if uid >= 0:  # root: no user namespace (it would map the program to host root; see _FIRST_UID)
        command = [bwrap, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command = [bwrap, "--unshare-user", "--disable-userns"]
    command += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--clearenv"]
    read_only, symlinks, hidden = _layout()
    made: set[str] = set()
    for path in read_only:
        parent, ancestors = os.path.dirname(path), []
        while parent not in ("/", "") and parent not in made:
            ancestors.append(parent)
            parent = os.path.dirname(parent)
        for ancestor in reversed(ancestors):  # traversable by the program's uid, whatever the host's mode
            command += ["--perms", "0755", "--dir", ancestor]
            made.add(ancestor)
        command += ["--ro-bind", path, path]
    for target, link in symlinks:
        command += ["--symlink", target, link]
    for path in hidden:
        command += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
    command += ["--dev", "/dev", "--perms", "1777", "--size", str(max_file_bytes), "--tmpfs", "/dev/shm"]
    command += ["--perms", "1777", "--size", str(_tmp_bytes(max_file_bytes)), "--tmpfs", "/tmp",
                "--perms", "0777", "--dir", _WORKDIR]
    if with_proc:
        command += ["--proc", "/proc"]
    command += ["--remount-ro", "/", "--chdir", _WORKDIR]
    for name, value in _sandbox_env(_WORKDIR).items():
        command += ["--setenv", name, value]
    return command + ["--", _interpreter(), "-I", "-S", "-c", _BOOTSTRAP]


def _unshare_command(uid: int, with_proc: bool, max_file_bytes: int, root: str, args: list[str]) -> list[str]:
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    command = [unshare] + ([] if uid >= 0 else ["--user", "--map-root-user"])
    command += ["--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts", "--propagation", "private"]
    read_only, symlinks, hidden = _layout()
    spec = {
        "root": root, "read_only": read_only, "symlinks": symlinks, "hidden": hidden,
        "tmp_bytes": _tmp_bytes(max_file_bytes), "workdir": _WORKDIR, "proc": with_proc, "uid": uid,
        "argv": [_interpreter(), "-I", "-S", "-c", _BOOTSTRAP, *args], "env": _sandbox_env(_WORKDIR),
    }
    return command + ["--", _interpreter(), "-I", "-S", "-c", _UNSHARE_SETUP, json.dumps(spec)]


def _sandbox_env(home: str) -> dict[str, str]:
    return {"PATH": _SANDBOX_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def probe(name: str) -> bool:
    """Whether backend `name` ("bwrap" or "unshare") runs a test program correctly here (cached); the
    reason it does not is kept for the error message."""
    if name not in ("bwrap", "unshare"):
        raise ValueError(f"unknown sandbox backend {name!r}; expected 'bwrap' or 'unshare'")
    with _probe_lock:
        if name not in _probed:
            tool = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
            if tool is None:
                _probed[name], _probe_errors[name] = False, f"{name} not found"
            else:
                try:  # both modes: plain (with /proc) and with tests (result pipe, thread, audit hook)
                    _probed[name], _probe_errors[name] = True, ""
                    for tests in (None, "assert x == 42\n"):
                        result = _run(name, "x = 6 * 7\nprint(x)\n", tests, 20.0, 256, 21, 2_000, 16, 16)
                        if not (result.passed and result.stdout == "42\n"):
                            stderr = result.stderr.strip()[-500:]
                            _probed[name] = False
                            _probe_errors[name] = (result.reason or "wrong output") + (
                                f"; stderr: {stderr}" if stderr else "")
                            break
                except OSError as error:
                    _probed[name], _probe_errors[name] = False, str(error)
        return _probed[name]


def backend() -> str:
    """The isolation run_python uses here: "bwrap", "unshare" or "none" (see the module docstring)."""
    for name in ("bwrap", "unshare"):
        if probe(name):
            return name
    return "none"


def check_backend(allow_unsafe: bool = False) -> str:
    """The backend in effect, or SandboxUnavailableError when there is none and the user did not opt
    in (`allow_unsafe` or ONELAYER_FAST_UNSAFE_SANDBOX=1); warns once when the unsafe mode is used."""
    global _warned_unsafe
    name = backend()
    if name != "none":
        return name
    if not (allow_unsafe or os.environ.get(UNSAFE_ENV) == "1"):
        why = "; ".join(f"{tool}: {_probe_errors.get(tool, '?')}" for tool in ("bwrap", "unshare"))
        raise SandboxUnavailableError(
            "no kernel isolation for untrusted code on this machine (" + why + "). Install bubblewrap "
            "(`apt-get install bubblewrap`) and allow user namespaces, or accept that model-written code "
            f"can read and write your files, reach the network and signal the trainer: {UNSAFE_ENV}=1.")
    if not _warned_unsafe:
        _warned_unsafe = True
        warnings.warn(
            f"onelayer_fast sandbox: UNSAFE mode ({UNSAFE_ENV}=1): model-written code runs without kernel "
            "isolation, as your user, with your files, the network and this process within its reach",
            RuntimeWarning, stacklevel=3)
    return name


# --------------------------------------------------------------------------------------------- pipes

class _Capture:
    """One output stream: its first and last bytes, `limit` in all, and how many bytes it had."""

    def __init__(self, limit: int):
        self.head_limit, self.tail_limit = limit - limit // 2, limit // 2
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > 2 * self.tail_limit + 65536:  # trim now and then, not on every read
            del self.tail[: len(self.tail) - self.tail_limit]

    def text(self) -> str:
        """All of it, or its head and tail (a traceback or a final line sits at the end) around a note
        of how much was cut."""
        tail = self.tail[len(self.tail) - min(len(self.tail), self.tail_limit):]
        if self.total <= len(self.head) + len(tail):
            return (self.head + tail).decode("utf-8", errors="replace")
        cut = self.total - len(self.head) - len(tail)
        return (self.head.decode("utf-8", errors="replace") + f"\n... [{cut} bytes of output truncated] ...\n"
                + tail.decode("utf-8", errors="replace"))


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (bwrap or unshare, whose PID namespace dies with them, or
    the unsafe mode's python and what it left in its group)."""
    for kill in (lambda: os.killpg(process.pid, signal.SIGKILL), process.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def _pump(process: subprocess.Popen, payload: bytes, captures: dict[int, _Capture], deadline: float,
          output_limit: int) -> str:
    """Write `payload` to the child's stdin and read its outputs until it has exited and they are all
    closed (or _DRAIN_S after its exit, should something outside a PID namespace hold them open), or
    until `deadline`. Returns "" or, with the child still running, "timeout" or "output" (too much)."""
    selector = selectors.DefaultSelector()
    stdin = process.stdin.fileno() if process.stdin and not process.stdin.closed else -1
    if stdin >= 0:
        os.set_blocking(stdin, False)
        selector.register(stdin, selectors.EVENT_WRITE)
    reading = set()
    for fd in captures:
        if fd >= 0:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
            reading.add(fd)
    try:  # a pidfd wakes select() at the child's exit; without one, poll every 50 ms
        pidfd = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") and process.returncode is None else -1
    except OSError:
        pidfd = -1
    if pidfd >= 0:
        selector.register(pidfd, selectors.EVENT_READ)
    sent, exited_at = 0, None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and process.poll() is not None:
                exited_at = now
                _kill(process)  # the unsafe mode's leftovers in the group; nothing in a namespace
            if exited_at is not None and (not reading or now >= exited_at + _DRAIN_S):
                return ""
            if now >= deadline:
                return "timeout" if exited_at is None else ""
            until = deadline if exited_at is None else min(deadline, exited_at + _DRAIN_S)
            wait = until - now if pidfd >= 0 else min(until - now, 0.05)
            for key, _events in selector.select(wait):
                fd = key.fd
                if fd == stdin:
                    try:
                        sent += os.write(fd, payload[sent:sent + 65536])
                    except BlockingIOError:
                        pass
                    except OSError:  # the child is gone or closed its stdin: nothing more to send
                        sent = len(payload)
                    if sent >= len(payload):
                        selector.unregister(fd)
                        process.stdin.close()
                elif fd == pidfd:
                    selector.unregister(fd)
                else:
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if data:
                        captures[fd].add(data)
                    else:
                        selector.unregister(fd)
                        reading.discard(fd)
            if sum(capture.total for capture in captures.values()) > output_limit and process.poll() is None:
                return "output"
    finally:
        selector.close()
        if pidfd >= 0:
            os.close(pidfd)


# -------------------------------------------------------------------------------------------- result

def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _reason(returncode: int, why: str, timeout_s: float, output_mb: int, stderr: str,
            tests_passed: bool | None) -> str:
    if why == "timeout":
        return f"timeout after {timeout_s:g} s (process group killed)"
    if why == "output":
        return f"output limit: more than {output_mb} MiB written to stdout/stderr (process killed)"
    last = _last_line(stderr)
    if returncode == 0:
        if tests_passed is False:
            return "tests did not finish" + (f": {last}" if last else " (no completion signal from the harness)")
        return ""
    if NETWORK_BLOCKED_MESSAGE in stderr:
        return "network blocked: " + last
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        detail = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file/output size limit)"}.get(name, "")
        return f"killed by {name}{detail}"
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


# ----------------------------------------------------------------------------------------------- run

def _run(name: str, code: str, tests: str | None, timeout_s: float, memory_mb: int, cpu_limit: int,
         max_output_chars: int, max_file_mb: int, max_processes: int) -> SandboxResult:
    marker = secrets.token_hex(16) if tests is not None else ""
    root_uid = os.geteuid() == 0 and name != "none"
    uid = _FIRST_UID + secrets.randbelow(_UID_COUNT) if root_uid else -1
    file_bytes = max_file_mb * 2**20
    result_read, result_write = os.pipe() if tests is not None else (-1, -1)
    args = [str(memory_mb * 2**20), str(max(1, cpu_limit)), str(file_bytes),
            # RLIMIT_NPROC counts per uid: outside a namespace that would be all of the user's processes.
            str(max_processes if name != "none" else 0),
            str(uid if name == "bwrap" else -1), str(result_write), "1" if name == "none" else "0"]
    texts = [code, tests or "", marker]
    data = [text.encode("utf-8", errors="surrogatepass") for text in texts]
    payload = b"".join(len(part).to_bytes(8, "little") for part in data) + b"".join(data)
    temporary = tempfile.mkdtemp(prefix="olf-sandbox-")  # the unsafe mode's cwd, or unshare's empty root
    launcher_env = {"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"}  # the trainer's environment stays out
    with_proc = tests is None  # test mode: no /proc at all (no /proc/self/mem to read the marker from)
    if name == "bwrap":
        command, cwd = _bwrap_command(uid, with_proc, file_bytes) + args, "/"
    elif name == "unshare":
        command, cwd = _unshare_command(uid, with_proc, file_bytes, temporary, args), "/"
    else:
        command, cwd = [_interpreter(), "-I", "-S", "-c", _BOOTSTRAP, *args], temporary
        launcher_env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": temporary, "TMPDIR": temporary,
                        "LANG": "C.UTF-8"}
    start = time.perf_counter()
    try:
        process = subprocess.Popen(
            command, cwd=cwd, env=launcher_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
            pass_fds=(result_write,) if result_write >= 0 else (),
        )
    except BaseException:
        for fd in (result_read, result_write):
            if fd >= 0:
                os.close(fd)
        _remove_tree(temporary)
        raise
    if result_write >= 0:
        os.close(result_write)  # else the trainer's own copy would keep the pipe from ever closing
    out, err = _Capture(max_output_chars), _Capture(max_output_chars)
    result = _Capture(_RESULT_BYTES)
    captures = {process.stdout.fileno(): out, process.stderr.fileno(): err}
    if result_read >= 0:
        captures[result_read] = result
    try:
        why = _pump(process, payload, captures, time.monotonic() + timeout_s, file_bytes)
        if why:
            _kill(process)
            process.wait()
            _pump(process, b"", captures, time.monotonic() + _DRAIN_S, sys.maxsize)
        returncode = process.wait()
    finally:
        if process.returncode is None:
            _kill(process)
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        if result_read >= 0:
            os.close(result_read)
        _remove_tree(temporary)
    duration = time.perf_counter() - start
    if name != "none" and returncode > 128 and returncode - 128 < signal.NSIG:
        returncode = 128 - returncode  # bwrap and our unshare PID 1 report signal N as 128 + N
    tests_passed = None if tests is None else ("\n" + marker + "\n").encode() in bytes(result.head + result.tail)
    stdout, stderr = out.text(), err.text()
    return SandboxResult(
        passed=not why and returncode == 0 and tests_passed is not False,
        returncode=returncode,
        timed_out=why == "timeout",
        stdout=stdout,
        stderr=stderr,
        duration_s=duration,
        reason=_reason(returncode, why, timeout_s, max_file_mb, stderr, tests_passed),
        tests_passed=tests_passed,
        backend=name,
    )


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_time_s: float | None = None,
    max_output_chars: int = 10_000,
    max_file_mb: int = 16,
    *,
    tests: str | None = None,
    max_processes: int = 64,
    allow_unsafe: bool = False,
    backend: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python script in an isolated, limited child process; see the module docstring.

    timeout_s: wall-clock limit, after which the child and everything it started get SIGKILL.
    memory_mb: address-space limit (RLIMIT_AS); an allocation beyond it raises MemoryError in the child.
    cpu_time_s: CPU-time limit (RLIMIT_CPU, whole seconds, rounded up); default ceil(timeout_s) + 1, a
        backstop that ends the child even if this process dies before the wall-clock timeout fires.
    max_output_chars: stdout and stderr are each cut to about this many bytes (head and tail kept).
    max_file_mb: largest file the child may write (RLIMIT_FSIZE, then SIGXFSZ), and how much it may
        write to stdout and stderr together before it is killed.
    tests: run these after `code` as the tests of test mode; `tests_passed` says whether they returned.
    max_processes: RLIMIT_NPROC, processes and threads of the run together (namespace backends only).
    allow_unsafe: without kernel isolation, run in the unsafe in-process mode instead of raising
        SandboxUnavailableError (as ONELAYER_FAST_UNSAFE_SANDBOX=1 does).
    backend: force "bwrap", "unshare" or "none" instead of the probed one (tests use this).
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be > 0, got {timeout_s}, {memory_mb}")
    if backend is None:
        backend = check_backend(allow_unsafe)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; expected one of {BACKENDS}")
    cpu_limit = math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s) + (1 if cpu_time_s is None else 0)
    return _run(backend, code, tests, timeout_s, memory_mb, cpu_limit, max_output_chars, max_file_mb, max_processes)
