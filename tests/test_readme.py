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
