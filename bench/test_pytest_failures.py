"""bench/pytest_failures.py on a tiny suite: each failure named on its own line as it happens (before
pytest's own summary) and in the file, once, also under pytest-xdist."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_passes():
    assert 1 + 1 == 2

def test_fails():
    assert [1, 2] == [1, 3], "lists differ"

def test_errors(broken):
    pass

@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    assert False
'''


def run(tmp_path, *extra):
    (tmp_path / "test_tiny.py").write_text(SUITE)
    failures = tmp_path / "out" / "failures.txt"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_failures",
                           f"--failures-file={failures}", "test_tiny.py", *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout, failures.read_text()


def check(stdout, recorded):
    # each on a line of its own, before pytest's own summary (which a killed run never prints)
    lines = stdout.split("short test summary info")[0].splitlines()
    assert "FAILED test_tiny.py::test_fails (call): AssertionError: lists differ" in lines, stdout
    assert "ERROR test_tiny.py::test_errors (setup): RuntimeError: fixture broke" in lines, stdout
    heads = [line for line in recorded.splitlines() if not line.startswith("    ")]
    assert sorted(h.split(" (")[0] for h in heads) == ["ERROR test_tiny.py::test_errors",
                                                       "FAILED test_tiny.py::test_fails"], recorded
    assert "expected_to_fail" not in recorded and "test_passes" not in recorded


def test_failures_named_at_once_and_in_the_file(tmp_path):
    check(*run(tmp_path, "-rfE"))


def test_under_xdist_only_the_controller_names_them(tmp_path):
    pytest.importorskip("xdist")
    check(*run(tmp_path, "-rfE", "-n", "2"))
