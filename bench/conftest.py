"""Shared setup of ``pytest bench/``: scope, time budget, results file, copy bandwidth.

Unlike ``tests/conftest.py`` this never switches on Triton's interpreter:
timing interpreted kernels means nothing. Without CUDA only the reference and
ToMe-style cases run (a small CPU subset); the fused cases skip.

Options:
  --tofu-scope=cpu|gpu|full   which cases (default: gpu with CUDA, else cpu)
  --tofu-budget-s=SECONDS     skip the remaining cases once this much time is spent
  --tofu-jsonl=PATH           append one JSON line per measured case as it
                              finishes (survives a run that is cut short)
"""
import json
import os
import sys
import time

import pytest
import torch

from measure import copy_bandwidth, environment

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def pytest_addoption(parser):
    group = parser.getgroup("tofu-bench")
    group.addoption("--tofu-scope", choices=("cpu", "gpu", "full"), default=None,
                    help="case set: cpu (small CPU subset), gpu (fits ~3 min on an H100), full (every combination)")
    group.addoption("--tofu-budget-s", type=float, default=None,
                    help="skip remaining cases once the session has run this many seconds")
    group.addoption("--tofu-jsonl", default=None, help="append one JSON record per measured case to this file")


def pytest_configure(config):
    scope = config.getoption("--tofu-scope") or ("gpu" if ON_GPU else "cpu")
    if scope != "cpu" and not ON_GPU:
        raise pytest.UsageError(f"--tofu-scope={scope} times GPU-sized shapes and needs CUDA; use --tofu-scope=cpu")
    config.tofu_scope = scope
    config.tofu_started = time.monotonic()
    config.tofu_copy = None
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench: TRITON_INTERPRET=1 is set; fused cases will be skipped", file=sys.stderr)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tofu"] = dict(environment(), scope=config.tofu_scope, copy=config.tofu_copy)


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def copy_bw(request, device):
    """Measured copy bandwidth (GB/s, read + write), once per session."""
    info = copy_bandwidth(device)
    request.config.tofu_copy = info
    command = "python -m pytest " + " ".join(request.config.invocation_params.args)
    _write_jsonl(request.config, dict(kind="session", scope=request.config.tofu_scope, command=command,
                                      **environment(), **info))
    return info["copy_gbps"]


@pytest.fixture
def within_budget(request):
    """Skip this case if the session's time budget is spent."""
    budget = request.config.getoption("--tofu-budget-s")
    if budget is not None and time.monotonic() - request.config.tofu_started > budget:
        pytest.skip(f"time budget of {budget:.0f} s spent")


@pytest.fixture
def record_case(request):
    """Call with a dict to append it to --tofu-jsonl (if given)."""
    return lambda record: _write_jsonl(request.config, dict(kind="case", test=request.node.name, **record))


def _write_jsonl(config, record) -> None:
    path = config.getoption("--tofu-jsonl")
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
