"""pytest plugin: name every failing test the moment its report arrives, and keep the names in a file.

A run cut short by a time limit never reaches pytest's own ``-rfE`` summary: the H200 run of 2026-12-04 saw
five ``F`` in its progress line and no names. With this plugin each failure prints at once, on a line of its
own, as

    FAILED tests/test_x.py::test_y[case] (call): AssertionError: first line of the message

(``ERROR`` for a failure in setup or teardown or in collecting a file), and is appended to ``--failures-file``
with the first lines of its error, flushed, so the file holds every failure seen up to a kill.

    PYTHONPATH=bench pytest -p pytest_failures --failures-file=/tmp/failures.txt tests/test_step.py -n 16

Works with pytest-xdist: the reports reach the controller, which alone prints and writes (the workers load
the plugin too, and stay quiet).
"""
import os
from typing import List, Optional

import pytest

ERROR_LINES = 6  # lines of each error kept in the file


def pytest_addoption(parser):
    parser.addoption("--failures-file", default=os.environ.get("PYTEST_FAILURES_FILE"),
                     help="append each failing test's id and the first lines of its error to this file "
                          "(default: $PYTEST_FAILURES_FILE; none: only print)")


def _error_lines(report) -> List[str]:
    """The lines that say what went wrong: pytest's ``E`` lines where there are any, else the crash message,
    else the end of the traceback."""
    text = report.longreprtext or ""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    if not lines:
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        lines = crash.splitlines() if crash else text.splitlines()[-ERROR_LINES:]
    return [line for line in lines if line.strip()][:ERROR_LINES] or ["(no message)"]


class FailureNamer:
    def __init__(self, config):
        self.config = config
        self.path: Optional[str] = config.getoption("failures_file")
        self.failed: List[str] = []
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def _record(self, word: str, nodeid: str, when: str, report) -> None:
        lines = _error_lines(report)
        head = f"{word} {nodeid} ({when}): {lines[0]}"
        self.failed.append(head)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            # -q's progress characters leave the line open; start ours on a fresh one
            if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 1):
                reporter.write("\n")
            reporter.write_line(head, red=True)
        else:
            print(head, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(head + "\n" + "".join(f"    {line}\n" for line in lines[1:]))

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report):
        if report.failed and not hasattr(report, "wasxfail"):
            self._record("FAILED" if report.when == "call" else "ERROR", report.nodeid, report.when, report)

    @pytest.hookimpl(trylast=True)
    def pytest_collectreport(self, report):
        if report.failed:
            self._record("ERROR", report.nodeid or "(collection)", "collect", report)

    def pytest_terminal_summary(self, terminalreporter):
        if self.failed:
            terminalreporter.section(f"{len(self.failed)} failed or errored, in the order they happened")
            for head in self.failed:
                terminalreporter.write_line(head)


def pytest_configure(config):
    # An xdist worker sends its reports to the controller, which names them: only the controller registers.
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(FailureNamer(config), "tofu_failure_namer")
