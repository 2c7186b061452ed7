"""A pytest plugin for .ci/run: appends the node id of every skipped test to $ONELAYER_CI_SKIPPED.

Loaded into the README's test command through the environment (PYTEST_ADDOPTS="-p record_skips", with
.ci on PYTHONPATH), so the command itself stays as README.md writes it. CI then reruns those tests, and
only those, once the optional extras are installed. Expected failures (xfail) are not skips.
"""
from __future__ import annotations

import os


def _record(report) -> None:
    path = os.environ.get("ONELAYER_CI_SKIPPED")
    if path and report.skipped and not hasattr(report, "wasxfail"):
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(report.nodeid + "\n")


def pytest_runtest_logreport(report) -> None:  # a test skipped by a mark or by pytest.skip()
    _record(report)


def pytest_collectreport(report) -> None:  # a whole module skipped (importorskip at module level)
    _record(report)
