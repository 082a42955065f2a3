"""Every Python snippet in README.md runs as pasted (on the CPU, random weights)."""
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, capsys):
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_readme_opens_with_the_command_ci_runs():
    # The README's first commands: install + demo, then install + tests, the latter exactly what .ci/run runs.
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    ci_command = next(line for line in ci.splitlines() if line.startswith("pip install"))
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    commands = [line.split("  #")[0].strip() for line in first_block]
    assert commands[0].startswith('pip install -e ".[demo]" && python -m tofu_triton demo')
    assert commands[1] == ci_command


def test_cpu_steps_come_first_and_their_check_runs():
    # A CPU-only reader is sent to the CPU steps before the first install command, and those steps pin torch and
    # torchvision together, install the test extras before pytest, and check torchvision by running one of its ops
    # (a torchvision built for another torch imports fine and fails at its first op).
    import subprocess
    import sys

    head, first_block = README.split("```bash\n", 1)
    assert "CPU steps" in head.split("\n", 1)[1]
    cpu = re.search(r"\*\*CPU steps\*\*.*?```bash\n(.*?)```", first_block, flags=re.S).group(1).splitlines()
    assert re.match(r"pip install torch==[\d.]+ torchvision==[\d.]+ --index-url https://download.pytorch.org/whl/cpu",
                    cpu[0])
    test_install = next(i for i, line in enumerate(cpu) if line.startswith('pip install -e ".[test]"'))
    assert test_install < next(i for i, line in enumerate(cpu) if line.startswith("pytest"))
    check = next(line for line in cpu if "torchvision.ops" in line)
    command, expected = check.split("  #")
    assert command.startswith('python -c "') and expected.strip() == "None tensor([0])"
    done = subprocess.run([sys.executable, "-c", command.strip()[len('python -c "'):-1]], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1)[1].strip() == "tensor([0])"  # the first word: None, or the CUDA version


def test_ci_fails_when_the_test_suite_fails(tmp_path):
    # .ci/run under `set -e`: a failing `pytest tests/` inside README's && list once let ruff's exit code decide.
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / ".ci" / "run", repo / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("pip", "exit 0"), ("ruff", "exit 0"), ("pytest", '[ "$1" = tests/ ] && exit 1; exit 0')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\necho {name} \"$@\" >> '{tmp_path}/calls'\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, (tmp_path / "calls").read_text()
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "pytest tests/"  # and nothing after it
