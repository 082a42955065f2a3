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
