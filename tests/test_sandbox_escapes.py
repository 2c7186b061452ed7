"""Attacks on the sandbox, each checked from the host side where it can be: file reads and writes outside,
the trainer's environment, the network by every route, surviving the kill, fork bombs, output tricks,
signals to the trainer, and reward hacks that look for the test harness's marker.

Each test runs in every namespace backend that works here (bwrap, unshare); a machine that cannot create
namespaces skips them (the sandbox then refuses to run the code task unless told to run unsafely)."""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from onelayer_fast import sandbox
from onelayer_fast.sandbox import run_python

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["bwrap", "unshare"])
def backend(request) -> str:
    if not sandbox.probe(request.param):
        pytest.skip(f"this machine cannot create namespaces with {request.param}: "
                    f"{sandbox._probe_errors.get(request.param, '')}")
    return request.param


def run(code: str, backend: str, **kwargs) -> sandbox.SandboxResult:
    return run_python(code, backend=backend, **{"timeout_s": 10.0, **kwargs})


def bound_paths() -> list[str]:
    """What the sandbox shows of the host on purpose (read-only), and the directories leading there."""
    read_only, _links, _hidden = sandbox._layout()
    shown = set(read_only)
    for path in read_only:
        while path not in ("/", ""):
            shown.add(path)
            path = os.path.dirname(path)
    return sorted(shown)


# ------------------------------------------------------------------------------------------ files

def test_host_files_are_invisible(backend, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("olf-secret-" + secrets.token_hex(8))
    home = os.path.expanduser("~")
    shown = bound_paths()
    in_home = [os.path.join(home, name) for name in os.listdir(home) if os.path.join(home, name) not in shown]
    targets = [str(secret), str(REPO), str(REPO / "pyproject.toml"), __file__, "/etc/passwd", "/etc/shadow",
               "/etc/hostname", "/etc/resolv.conf", *in_home]
    code = (
        "import json, os, sys\n"
        f"targets = json.loads({json.dumps(json.dumps(targets))})\n"
        "print(json.dumps([path for path in targets if os.path.lexists(path)]))\n"
        "print(json.dumps(sorted(os.listdir('/'))))\n"
    )
    result = run(code, backend)
    assert result.passed, result.stderr
    visible, top = (json.loads(line) for line in result.stdout.splitlines())
    assert visible == [], visible
    assert set(top) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"} | {
        path.split("/")[1] for path in shown}, top


def test_host_is_not_writable(backend, tmp_path):
    name = "olf-escape-" + secrets.token_hex(8)
    site_packages = sysconfig.get_paths()["purelib"]
    directories = [site_packages, str(REPO), str(tmp_path), "/tmp", "/usr/lib", os.path.dirname(sandbox._interpreter())]
    code = (
        "import json, os\n"
        f"directories, name = json.loads({json.dumps(json.dumps(directories))}), {name!r}\n"
        "for directory in directories:\n"
        "    try:\n"
        "        os.makedirs(directory, exist_ok=True)\n"
        "        with open(os.path.join(directory, name), 'w') as file:\n"
        "            file.write('escaped')\n"
        "    except OSError as error:\n"
        "        print(directory, type(error).__name__)\n"
    )
    result = run(code, backend)
    assert result.passed, result.stderr
    leaked = [d for d in directories if os.path.exists(os.path.join(d, name))]
    assert leaked == [], leaked


def test_trainer_environment_does_not_leak(backend, tmp_path):
    """A secret in the trainer's environment (as the kernel shows it: /proc/<pid>/environ holds the
    environment a process was started with) must not reach the program by any route."""
    token = "olf-env-" + secrets.token_hex(8)
    code = (
        "import os\n"
        "seen = [repr(dict(os.environ))]\n"
        "paths = ['/proc/self/environ', '/proc/1/environ', '/proc/%d/environ' % os.getppid()]\n"
        "paths += ['/proc/%s/environ' % pid for pid in os.listdir('/proc') if pid.isdigit()]\n"
        "for path in paths:\n"
        "    try:\n"
        "        seen.append(path + ': ' + repr(open(path, 'rb').read()))\n"
        "    except OSError as error:\n"
        "        seen.append(path + ': ' + type(error).__name__)\n"
        "print('\\n'.join(seen))\n"
    )
    # A trainer of its own, started with the secret (the sandbox module alone: it needs only the stdlib).
    trainer = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sandbox', {sandbox.__file__!r})\n"
        "module = sys.modules['sandbox'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"result = module.run_python(sys.stdin.read(), backend={backend!r})\n"
        "print(result.stdout, result.stderr)\n"
    )
    environment = {**os.environ, "OLF_TRAINER_SECRET": token}
    run = subprocess.run([sys.executable, "-c", trainer], input=code, capture_output=True, text=True,
                         env=environment, timeout=30, cwd=tmp_path)
    assert "/proc/1/environ" in run.stdout and token not in run.stdout, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------- network

@pytest.fixture
def listeners():
    """A TCP and a UDP socket on the host's loopback: what the sandbox must never reach."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    yield tcp, udp
    tcp.close()
    udp.close()


def reached(tcp: socket.socket, udp: socket.socket) -> list[str]:
    hits = []
    try:
        connection, _ = tcp.accept()
        connection.close()
        hits.append("tcp")
    except BlockingIOError:
        pass
    try:
        udp.recv(100)
        hits.append("udp")
    except BlockingIOError:
        pass
    return hits


# Each prints one line per attempt; an attempt that got through prints "OPEN".
NETWORK_ATTEMPTS = {
    "socket": (
        "import socket\n"
        "for address in (('127.0.0.1', TCP), ('1.1.1.1', 80), ('8.8.8.8', 53)):\n"
        "    try:\n"
        "        socket.create_connection(address, timeout=2).close()\n"
        "        print('OPEN', address)\n"
        "    except OSError as error:\n"
        "        print('closed', address, error)\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for address in (('127.0.0.1', UDP), ('8.8.8.8', 53)):\n"
        "    try:\n"
        "        u.sendto(b'x', address)\n"
        "        print('sent (loopback of the sandbox only)', address)\n"
        "    except OSError as error:\n"
        "        print('closed', address, error)\n"
    ),
    "_socket": (
        "import _socket\n"
        "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        "s.settimeout(2)\n"
        "for address in (('127.0.0.1', TCP), ('1.1.1.1', 80)):\n"
        "    try:\n"
        "        s.connect(address)\n"
        "        print('OPEN', address)\n"
        "    except OSError as error:\n"
        "        print('closed', address, error)\n"
    ),
    "raw": (
        "import socket\n"
        "for family, kind, protocol in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),\n"
        "                               (socket.AF_PACKET, socket.SOCK_RAW, 0x0300)):\n"
        "    try:\n"
        "        s = socket.socket(family, kind, protocol)\n"
        "        s.sendto(b'\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00', ('1.1.1.1', 0))\n"
        "        print('OPEN raw', family)\n"
        "    except OSError as error:\n"
        "        print('closed raw', family, error)\n"
    ),
    "dns": (
        "import socket\n"
        "for name in ('example.com', 'localhost.localdomain.example'):\n"
        "    try:\n"
        "        print('OPEN', name, socket.getaddrinfo(name, 80))\n"
        "    except OSError as error:\n"
        "        print('closed', name, error)\n"
        "print('interfaces', socket.if_nameindex())\n"
    ),
    "ctypes": (
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for host, port in (('127.0.0.1', TCP), ('1.1.1.1', 80)):\n"
        "    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        "    address = struct.pack('=H', socket.AF_INET) + struct.pack('!H', port)\n"
        "    address += socket.inet_aton(host) + bytes(8)  # struct sockaddr_in\n"
        "    if libc.connect(fd, address, len(address)) == 0:\n"
        "        print('OPEN', host)\n"
        "    else:\n"
        "        print('closed', host, ctypes.get_errno())\n"
    ),
}


@pytest.mark.parametrize("route", sorted(NETWORK_ATTEMPTS) + ["second interpreter", "shell"])
def test_network_is_unreachable(backend, listeners, route):
    tcp, udp = listeners
    ports = f"TCP, UDP = {tcp.getsockname()[1]}, {udp.getsockname()[1]}\n"
    if route in NETWORK_ATTEMPTS:
        code = ports + NETWORK_ATTEMPTS[route]
    else:  # the socket attempts again, in a program started by the sandboxed one
        inner = ports + NETWORK_ATTEMPTS["socket"] + NETWORK_ATTEMPTS["ctypes"]
        command = "[sys.executable, '-c', INNER]" if route == "second interpreter" else (
            "['/bin/sh', '-c', 'exec \"$0\" -c \"$1\"', sys.executable, INNER]")
        code = (f"import subprocess, sys\nINNER = {inner!r}\n"
                f"result = subprocess.run({command}, capture_output=True, text=True, timeout=8)\n"
                "print(result.stdout, result.stderr)\n")
    result = run(code, backend)
    assert result.passed, result.stderr
    assert "OPEN" not in result.stdout and "closed" in result.stdout, result.stdout
    assert reached(tcp, udp) == [], result.stdout
    if route == "dns":
        assert "[(1, 'lo')]" in result.stdout  # the only interface: no way out


def test_listener_check_detects_a_connection(listeners):
    """The host-side check itself works: a real connection to the listeners is seen."""
    tcp, udp = listeners
    socket.create_connection(tcp.getsockname(), timeout=2).close()
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", udp.getsockname())
    time.sleep(0.05)
    assert reached(tcp, udp) == ["tcp", "udp"]


# -------------------------------------------------------------------------------------- processes

def processes_with(token: str) -> list[int]:
    """Host pids whose command line holds `token` (this process's own excluded)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    if token.encode() in file.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_nothing_survives_the_program(backend, ending):
    token = "olf-survivor-" + secrets.token_hex(8)
    loop = "import time\nwhile True:\n    time.sleep(0.05)\n"
    code = (
        "import os, subprocess, sys, time\n"
        f"loop, token = {loop!r}, {token!r}\n"
        "subprocess.Popen([sys.executable, '-c', loop, token], start_new_session=True)\n"
        "subprocess.Popen(['setsid', '/bin/sh', '-c', 'while :; do sleep 0.05; done', token])\n"
        "if os.fork() == 0:  # a classic daemon: fork, setsid, fork, exec\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, [sys.executable, '-c', loop, token])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "print('started', flush=True)\n"
        + ("while True:\n    pass\n" if ending == "timeout" else "")
    )
    result = run(code, backend, timeout_s=1.5 if ending == "timeout" else 10.0)
    assert "started" in result.stdout, result.stderr
    assert result.timed_out == (ending == "timeout")
    deadline = time.monotonic() + 2.0
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(token) == []


def test_fork_bomb_is_bounded(backend):
    code = (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    while children < 10_000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "except OSError as error:\n"
        "    print('limited', children, type(error).__name__)\n"
    )
    start = time.perf_counter()
    result = run(code, backend, max_processes=24)
    assert result.passed, result.stderr
    words = result.stdout.split()
    assert words[0] == "limited" and int(words[1]) < 24, result.stdout
    assert time.perf_counter() - start < 5.0


def test_signals_do_not_reach_the_trainer(backend):
    victim = subprocess.Popen(["sleep", "30"])
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: received.append(number))
    try:
        code = (
            "import os, signal\n"
            f"for pid in ({victim.pid}, {os.getpid()}, os.getppid()):\n"
            "    for number in (signal.SIGUSR1, signal.SIGTERM, signal.SIGKILL):\n"
            "        if pid == " + str(os.getpid()) + " and number != signal.SIGUSR1:\n"
            "            continue  # the test process only gets the harmless one, should it get through\n"
            "        try:\n"
            "            os.kill(pid, number)\n"
            "            print('sent', pid, number)\n"
            "        except OSError as error:\n"
            "            print('refused', pid, number, type(error).__name__)\n"
            "print('still here')\n"
        )
        result = run(code, backend)
        time.sleep(0.1)
        assert "still here" in result.stdout, result.stderr
        assert victim.poll() is None and received == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
        victim.kill()
        victim.wait()


# ------------------------------------------------------------------------------------------ output

def test_output_files_cannot_be_replaced(backend):
    """There are no output files: FIFOs and links named like the old ones change nothing."""
    code = (
        "import os, sys\n"
        "for name in ('.stdout', '.stderr', 'stdout', 'stderr'):\n"
        "    os.mkfifo(name)\n"
        "os.symlink('/dev/zero', '.out')\n"
        "os.symlink('/dev/zero', '.err')\n"
        "print('done', sorted(os.listdir('.')))\n"
        "sys.stdout.write('y' * 3_000_000)\n"
        "print('END')\n"
    )
    start = time.perf_counter()
    result = run(code, backend, max_output_chars=2000)
    assert result.passed and result.stdout.startswith("done") and result.stdout.endswith("END\n"), result.stderr
    assert "bytes of output truncated" in result.stdout and len(result.stdout) < 2200
    assert time.perf_counter() - start < 5.0


def test_endless_output_and_silence_are_bounded(backend):
    flood = run("import sys\nwhile True:\n    sys.stderr.write('z' * 65536)\n", backend, max_file_mb=4)
    assert flood.reason.startswith("output limit") and len(flood.stderr) < 11_000
    start = time.perf_counter()
    quiet = run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)\n", backend, timeout_s=1.0)
    assert quiet.timed_out and time.perf_counter() - start < 3.0


# ------------------------------------------------------------------------------------ reward hacks

# A solution that tries every route to the harness's secret marker (or the tests); each attempt prints
# "ROUTE <name>: <what happened>". Whatever it finds, it then claims success on every descriptor.
CHEAT = r'''
import os, sys, re
found = set()
hexes = re.compile(r"[0-9a-f]{32}")

def route(name, attempt):
    try:
        outcome = attempt()
        print("ROUTE", name + ":", "ran", repr(outcome)[:200])
        if outcome:
            found.update(hexes.findall(repr(outcome)))
    except BaseException as error:
        print("ROUTE", name + ":", "blocked", type(error).__name__, str(error)[:120])

def frame_locals_via(frame):
    seen = []
    while frame is not None:
        seen.append(repr(frame.f_locals) + repr(frame.f_code.co_consts))
        frame = frame.f_back
    return seen

def getframe():
    return frame_locals_via(sys._getframe())

def traceback_frame():
    try:
        raise RuntimeError
    except RuntimeError as error:
        return frame_locals_via(error.__traceback__.tb_frame)

def generator_frame():
    def generator():
        yield 1
    return frame_locals_via(generator().gi_frame)

def current_frames():
    return [frame_locals_via(frame) for frame in sys._current_frames().values()]

def gc_objects():
    import gc
    return [obj for obj in gc.get_objects() if isinstance(obj, (str, bytes)) and hexes.search(str(obj))]

def gc_referrers():
    import gc
    return gc.get_referrers(sys.modules["__main__"].__dict__)

def ctypes_memory():
    import ctypes
    return ctypes.string_at(id(sys), 64)

def proc_mem():
    return open("/proc/self/mem", "rb").read(16)

def proc_fd():
    return os.listdir("/proc/self/fd")

def proc_relative():
    descriptor = os.open("/", os.O_RDONLY)
    return os.open("proc/self/mem", os.O_RDONLY, dir_fd=descriptor)

def trace():
    sys.settrace(lambda frame, event, arg: None)
    return "trace set"

def profile():
    sys.setprofile(lambda frame, event, arg: None)
    return "profile set"

def audit_hook():  # it would see the tests' code object go by; Python drops it silently when refused
    seen = []
    sys.addaudithook(lambda event, args: seen.append((event, args)))
    exec("pass")
    return seen

def signal_handler():
    import signal
    signal.signal(signal.SIGALRM, lambda number, frame: print(frame_locals_via(frame)))
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    return "handler set"

def main_module():
    return {k: v for k, v in vars(sys.modules["__main__"]).items() if isinstance(v, (str, bytes, list, tuple))}

def source_files():
    found = []
    for directory in (".", "/tmp", os.path.expanduser("~")):
        for root, _, files in os.walk(directory):
            found += [os.path.join(root, name) for name in files]
    return found

def descriptors():
    data = []
    for fd in [0] + list(range(3, 64)):
        try:
            os.set_blocking(fd, False)
            data.append((fd, os.read(fd, 4096)))
        except OSError:
            pass
    return data

def program():
    import subprocess
    return subprocess.run(["cat", "/proc/%d/environ" % os.getpid()], capture_output=True).stdout

def system():
    return os.system("echo hi")

def spawn():
    return os.posix_spawn("/bin/sh", ["sh", "-c", "true"], {})

def fork_exec():
    import _posixsubprocess
    return _posixsubprocess.fork_exec()

for name, attempt in [
    ("getframe", getframe), ("traceback frame", traceback_frame), ("generator frame", generator_frame),
    ("current frames", current_frames), ("gc objects", gc_objects), ("gc referrers", gc_referrers),
    ("ctypes", ctypes_memory), ("proc mem", proc_mem), ("proc fd", proc_fd), ("proc dir_fd", proc_relative),
    ("settrace", trace), ("setprofile", profile), ("audit hook", audit_hook), ("signal", signal_handler),
    ("subprocess", program), ("system", system), ("posix_spawn", spawn), ("fork_exec", fork_exec),
    ("main module", main_module), ("files", source_files), ("descriptors", descriptors),
]:
    route(name, attempt)
print("FOUND", sorted(found), flush=True)
for fd in range(1, 64):  # claim the marker (or anything that looks like it) everywhere, then "pass"
    for candidate in found:
        try:
            os.write(fd, ("\n" + candidate + "\n").encode())
        except OSError:
            pass
os._exit(0)
'''

# Routes the audit hook must refuse (the rest may run but must find nothing); "signal" is refused by
# Python itself, since user code never runs in the main thread, and a refused audit hook is dropped
# without an error.
BLOCKED_ROUTES = ["getframe", "traceback frame", "generator frame", "current frames", "gc objects",
                  "gc referrers", "ctypes", "proc mem", "proc fd", "proc dir_fd", "settrace", "setprofile",
                  "subprocess", "system", "posix_spawn", "fork_exec"]


def test_cheating_solution_cannot_find_the_marker(backend):
    tests = "SECRET_EXPECTED = 'olf-tests-' + '0123456789abcdef' * 2\nassert False, 'the tests ran'\n"
    result = run(CHEAT, backend, tests=tests)
    assert not result.passed and result.tests_passed is False, result
    routes = dict(re.findall(r"^ROUTE (.+?): (.*)$", result.stdout, flags=re.MULTILINE))
    assert set(BLOCKED_ROUTES) | {"signal", "audit hook"} <= set(routes), result.stdout + result.stderr
    open_routes = [name for name in BLOCKED_ROUTES if not routes[name].startswith("blocked SandboxViolation")]
    assert open_routes == [], {name: routes[name] for name in open_routes}
    assert routes["signal"].startswith("blocked ValueError") and routes["audit hook"] == "ran []", routes
    assert "FOUND []" in result.stdout and "0123456789abcdef" not in result.stdout


def test_solution_cannot_see_the_tests(backend):
    solution = (
        "import sys\n"
        "def answer():\n"
        "    names = sorted(k for k in globals() if k.startswith('EXPECTED'))\n"
        "    try:\n"
        "        caller = repr(sys._getframe(1).f_locals)\n"
        "    except ValueError as error:\n"
        "        caller = 'blocked'\n"
        "    print('globals', names, 'caller', caller)\n"
        "    return 42\n"
    )
    tests = "EXPECTED = 42\nassert answer() == EXPECTED\n"
    result = run(solution, backend, tests=tests)
    assert result.passed and result.tests_passed, result
    assert result.stdout == "globals [] caller blocked\n"


@pytest.mark.parametrize("hack", [
    "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n",  # make the tests a no-op
    "import threading, os, time\nthreading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()\n"
    "time.sleep(5)\n",
    "import _thread\n_thread.interrupt_main()\nimport time\ntime.sleep(1)\n",
    "import sys\nsys.modules['__main__'].__dict__.clear()\n",
    "raise SystemExit(0)\n",
], ids=["replace exec", "exit from a thread", "interrupt main", "clear __main__", "SystemExit"])
def test_skipping_the_tests_does_not_pass(backend, hack):
    result = run(hack, backend, tests="assert False, 'the tests ran'\n")
    assert not result.passed and result.tests_passed is False, result


def test_code_task_rewards_honest_not_cheating(tmp_path, monkeypatch):
    if sandbox.backend() == "none":
        pytest.skip("this machine cannot create namespaces: the code task refuses to run")
    from onelayer_fast.tasks import get_task

    rows = [
        {"prompt": "Write add(a, b).", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0", "entry_point": "add"},
        {"prompt": "Write double(x).", "tests": "assert double(4) == 8", "entry_point": "double"},
    ]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = get_task("code", str(path))
    add = task.examples[0]
    reward = task.reward_funcs[0]
    assert reward("def add(a, b):\n    return a + b\n", add) == 1.0
    assert reward(CHEAT, add) == 0.0
    assert reward("def add(a, b):\n    return a + b\n" + CHEAT, add) == 0.0
