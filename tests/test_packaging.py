"""setup.py ships every package directory, with kernels/ as tofu_triton.kernels."""
import os
from pathlib import Path

import setuptools  # noqa: F401  (first: makes `distutils` setuptools' own copy)
from distutils.core import run_setup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_setup_lists_every_package():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        dist = run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)
    assert dist.package_dir["tofu_triton.kernels"] == "kernels"
    on_disk = {"tofu_triton.kernels"} | {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tofu_triton").rglob("__init__.py")
    }
    assert set(dist.packages) == on_disk


def test_version_is_defined_once():
    import tofu_triton

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        dist = run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)
    assert dist.get_version() == tofu_triton.__version__
    assert "version" not in (ROOT / "pyproject.toml").read_text().split("[build-system]")[0]
