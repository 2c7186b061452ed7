"""The sandbox: limits hold, the parent is unharmed, network is blocked, nothing is left behind, test
mode tells whether the tests ran. Attacks on the isolation itself are in test_sandbox_escapes.py."""
from __future__ import annotations

import ast
import os
import resource
import time

import pytest

from onelayer_fast import sandbox
from onelayer_fast.sandbox import NETWORK_BLOCKED_MESSAGE, SandboxUnavailableError, run_python


@pytest.fixture(autouse=True)
def _any_backend(monkeypatch):
    """These behaviours hold in every backend: where no kernel isolation works, run them in the unsafe
    mode (the escape tests skip there instead)."""
    if sandbox.backend() == "none":
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")


def test_good_code_passes():
    result = run_python("import math\nprint(math.factorial(5))\n")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.stdout == "120\n" and result.stderr == "" and result.reason == ""
    assert 0 < result.duration_s < 5


def test_failing_code_reports_why():
    result = run_python("assert 1 + 1 == 3, 'bad math'\n")
    assert not result.passed and result.returncode == 1 and not result.timed_out
    assert "AssertionError: bad math" in result.stderr and "AssertionError" in result.reason
    assert run_python("import sys\nsys.exit(3)\n").returncode == 3
    assert not run_python("def f(:\n").passed  # syntax error


def test_infinite_loop_is_killed_within_timeout():
    start = time.perf_counter()
    # The loop also starts a background child, which must die with the process group.
    result = run_python("import subprocess\nsubprocess.Popen(['sleep', '60'])\nwhile True:\n    pass\n", timeout_s=1.0)
    elapsed = time.perf_counter() - start
    assert result.timed_out and not result.passed and result.returncode == -9
    assert "timeout" in result.reason
    assert 1.0 <= elapsed < 3.0


def test_memory_hog_fails_without_hurting_parent():
    limits_before = resource.getrlimit(resource.RLIMIT_AS)
    result = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')\n", memory_mb=64)
    assert not result.passed and "MemoryError" in result.stderr and result.reason.startswith("memory limit")
    assert result.stdout == ""
    assert resource.getrlimit(resource.RLIMIT_AS) == limits_before  # the limit stayed in the child
    big = bytearray(128 * 1024**2)  # the parent itself can still allocate more than the child's limit
    assert len(big) == 128 * 1024**2


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\n"
        "s.connect(('8.8.8.8', 53))\n",
        "import socket\nsocket.getaddrinfo('example.com', 80)\n",
        "import urllib.request\nurllib.request.urlopen('http://1.1.1.1/', timeout=2)\n",
    ],
)
def test_network_is_blocked(code):
    result = run_python(code)
    assert not result.passed and not result.timed_out
    if result.backend == "none":  # the in-process block: its own message
        assert NETWORK_BLOCKED_MESSAGE in result.stderr, result.stderr
        assert result.reason.startswith("network blocked"), result.reason
    else:  # a network namespace with only loopback: no route, and no name server
        assert any(error in result.stderr for error in ("Network is unreachable", "gaierror", "name resolution",
                                                        "Name or service not known")), result.stderr
        assert "timed out" not in result.stderr and result.duration_s < 2, result.stderr


def test_network_block_is_catchable_and_environment_is_clean():
    code = (
        "import os, socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
        "except OSError as error:\n"
        "    print('blocked')\n"
        "print(sorted(os.environ))\n"
    )
    result = run_python(code)
    assert result.passed, result.stderr
    blocked, names = result.stdout.splitlines()
    assert blocked == "blocked"  # bwrap also sets PWD, to the cwd
    assert set(ast.literal_eval(names)) - {"PWD"} == {"HOME", "LANG", "PATH", "TMPDIR"}, names


def test_tmp_dir_is_cwd_and_removed():
    result = run_python("import os\nopen('left.txt', 'w').write('x')\nos.mkdir('sub')\nos.chmod('sub', 0)\nprint(os.getcwd())\n")
    assert result.passed, result.stderr
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("olf-sandbox-")
    assert not os.path.exists(workdir)  # namespace backends: a private tmpfs, never on the host at all
    # Isolated mode: a module in the working directory does not shadow the standard library.
    assert run_python("open('json.py', 'w').write('raise SystemExit(5)')\nimport json\n").passed


def test_output_is_truncated_keeping_head_and_tail():
    code = "print('x' * 50_000)\nprint('END')\nimport sys\nsys.stderr.write('e' * 50_000)\n"
    result = run_python(code, max_output_chars=1000)
    assert result.passed
    assert result.stdout.startswith("x" * 500) and result.stdout.endswith("x" * 495 + "\nEND\n")
    assert "bytes of output truncated" in result.stdout and len(result.stdout) < 1100
    assert result.stderr.startswith("e" * 500) and len(result.stderr) < 1100


def test_bad_arguments():
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)


def test_output_flood_is_cut_off():
    start = time.perf_counter()
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=10.0, max_file_mb=2)
    assert not result.passed and not result.timed_out and result.reason.startswith("output limit"), result.reason
    assert time.perf_counter() - start < 5.0 and len(result.stdout) < 11_000


def test_tests_mode_reports_whether_tests_ran():
    solution = "def add(a, b):\n    return a + b\nprint('defined')\n"
    good = run_python(solution, tests="assert add(2, 3) == 5\nprint('tested')\n")
    assert good.passed and good.tests_passed is True and good.stdout == "defined\ntested\n", good
    bad = run_python(solution, tests="assert add(2, 3) == 6, 'wrong sum'\n")
    assert not bad.passed and bad.tests_passed is False and "AssertionError: wrong sum" in bad.reason
    for early_exit in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
        result = run_python(early_exit, tests="print('tested')\n")
        assert not result.passed and result.tests_passed is False and "tested" not in result.stdout, result
    syntax = run_python("def f(:\n", tests="pass\n")
    assert not syntax.passed and "SyntaxError" in syntax.reason
    assert run_python("x = 1\n").tests_passed is None  # no tests, no verdict on them


def test_no_isolation_refuses_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "backend", lambda: "none")
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailableError, match=sandbox.UNSAFE_ENV):
        run_python("print(1)")
    monkeypatch.setattr(sandbox, "_warned_unsafe", False)
    with pytest.warns(RuntimeWarning, match="UNSAFE"):
        result = run_python("print(1)", allow_unsafe=True)
    assert result.passed and result.backend == "none"
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert sandbox.check_backend() == "none"
