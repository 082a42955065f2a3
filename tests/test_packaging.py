"""setup.py ships every package directory, with kernels/ as tofu_triton.kernels, and one version."""
import os
from pathlib import Path

import pytest
import setuptools  # noqa: F401  (first: makes `distutils` setuptools' own copy)
from distutils.core import run_setup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)


def test_setup_lists_every_package(dist):
    assert dist.package_dir["tofu_triton.kernels"] == "kernels"
    on_disk = {"tofu_triton.kernels"} | {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tofu_triton").rglob("__init__.py")
    }
    assert set(dist.packages) == on_disk


def test_version_is_defined_once(dist):
    import tofu_triton

    assert dist.get_version() == tofu_triton.__version__
    assert "version" not in (ROOT / "pyproject.toml").read_text().split("[build-system]")[0]


def _run_in_root(code: str, *flags: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_kernels_folder_never_stands_in_for_another_kernels_package():
    # transformers >= 5.25 imports Hugging Face's `kernels` package when it loads.
    # Started in the repository root, `import kernels` used to find our kernels/
    # folder instead, and every transformers / diffusers import died.
    import kernels as hf_kernels  # from this test file's directory: the real one (the test extra installs it)
    assert Path(hf_kernels.__file__).resolve().parent != ROOT / "kernels", "the test extra installs HF's kernels"
    code = (
        "import kernels, tofu_triton.kernels, tofu_triton.patch\n"
        "from transformers import BertModel, ViTModel\n"
        "from diffusers import UNet2DConditionModel\n"
        "from kernels import CUDAProperties\n"  # what transformers' hub integration takes from it
        "print(kernels.__file__); print(tofu_triton.kernels.__file__)\n"
    )
    result = _run_in_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs, ours = result.stdout.split()
    assert Path(theirs).resolve() == Path(hf_kernels.__file__).resolve()
    import tofu_triton.kernels

    assert Path(ours).resolve() == Path(tofu_triton.kernels.__file__).resolve()  # the installed one, untouched


def test_without_another_kernels_package_the_import_fails_cleanly():
    # -S: no site-packages, so nothing else on sys.path is called kernels.
    result = _run_in_root("import sys; sys.path.insert(0, ''); import kernels", "-S")
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr, result.stderr[-2000:]
    assert "sys.modules" not in result.stderr
    ok = _run_in_root("import sys; sys.path.insert(0, '')\ntry:\n    import kernels\nexcept ImportError:\n    pass\n"
                      "assert 'kernels' not in sys.modules", "-S")
    assert ok.returncode == 0, ok.stderr[-2000:]
