"""The sandbox: limits hold, the parent is unharmed, network is blocked, nothing is left behind."""
from __future__ import annotations

import os
import resource
import time

import pytest

from onelayer_fast.sandbox import NETWORK_BLOCKED_MESSAGE, run_python


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
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/', timeout=1)\n",
    ],
)
def test_network_is_blocked(code):
    result = run_python(code)
    assert not result.passed and not result.timed_out
    assert NETWORK_BLOCKED_MESSAGE in result.stderr, result.stderr
    assert result.reason.startswith("network blocked"), result.reason


def test_network_block_is_catchable_and_environment_is_clean():
    code = (
        "import os, socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9))\n"
        "except PermissionError as error:\n"
        "    print('blocked:', error)\n"
        "print(sorted(k for k in os.environ if 'proxy' in k.lower()))\n"
    )
    result = run_python(code)
    assert result.passed, result.stderr
    assert result.stdout == f"blocked: {NETWORK_BLOCKED_MESSAGE}\n[]\n"


def test_tmp_dir_is_cwd_and_removed():
    result = run_python("import os\nopen('left.txt', 'w').write('x')\nos.mkdir('sub')\nos.chmod('sub', 0)\nprint(os.getcwd())\n")
    assert result.passed, result.stderr
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("olf-sandbox-")
    assert not os.path.exists(workdir)
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
