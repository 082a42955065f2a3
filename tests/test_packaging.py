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


def _run_in_root(code: str, *flags: str, args=()):
    import subprocess
    import sys

    command = [sys.executable, *flags, "-c", code, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


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


def test_without_another_kernels_package_the_import_gives_an_empty_namespace_package():
    # -S: no site-packages, so nothing else on sys.path is called kernels. The
    # import succeeds (transformers' availability check imports it) but yields
    # a namespace package's look with nothing of ours in it: no __file__, no
    # __version__, no names, no submodules.
    code = (
        "import importlib.util, sys; sys.path.insert(0, '')\n"
        "import kernels\n"
        "assert sys.modules['kernels'] is kernels and kernels.__file__ is None and list(kernels.__path__) == []\n"
        "assert [name for name in vars(kernels) if not name.startswith('__')] == [], vars(kernels)\n"
        "assert importlib.util.find_spec('kernels').origin is None\n"
        "for statement in ('from kernels import common', 'import kernels.common'):\n"
        "    try:\n"
        "        exec(statement)\n"
        "        raise AssertionError(statement + ' worked')\n"
        "    except ImportError:\n"
        "        pass\n"
        "assert [name for name in sys.modules if name.startswith('kernels.')] == []\n"
    )
    result = _run_in_root(code, "-S")
    assert result.returncode == 0, result.stderr[-2000:]


# Hides every distribution and package called `kernels` on sys.path except our
# folder in the repository root, the way a machine without Hugging Face's
# kernels looks: each sys.path entry that holds one is replaced by a directory
# of links to everything else in it (so importlib.metadata does not see its
# dist-info either). The .pth files of site-packages have run by then.
_WITHOUT_HF_KERNELS = """\
import os, sys
root, links = os.path.realpath(os.curdir), sys.argv[1]
def _theirs(name):
    return name == "kernels" or name.startswith("kernels-") and name.endswith((".dist-info", ".egg-info"))
for i, entry in enumerate(sys.path):
    if os.path.realpath(entry or os.curdir) == root or not os.path.isdir(entry):
        continue
    names = os.listdir(entry)
    if any(map(_theirs, names)):
        shadow = sys.path[i] = os.path.join(links, str(i))
        os.mkdir(shadow)
        for name in names:
            if not _theirs(name):
                os.symlink(os.path.join(entry, name), os.path.join(shadow, name))
"""


def test_without_hf_kernels_transformers_and_diffusers_import_in_the_root(tmp_path):
    # A GPU machine without Hugging Face's kernels: transformers' availability
    # check finds our folder (find_spec), sees no distribution called kernels,
    # and falls back to importing it; that import has to succeed and look like
    # nothing is installed, or every transformers / diffusers import fails.
    code = _WITHOUT_HF_KERNELS + (
        "import importlib.metadata, importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"  # only our folder is left under that name
        "assert os.path.realpath(spec.origin) == os.path.join(root, 'kernels', '__init__.py'), spec\n"
        "try:\n"
        "    importlib.metadata.version('kernels')\n"
        "    raise AssertionError('the kernels distribution is still visible')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    pass\n"
        "from transformers import BertModel, ViTModel\n"
        "from diffusers import UNet2DConditionModel\n"
        "import transformers.utils, diffusers.utils\n"
        "assert not transformers.utils.is_kernels_available()\n"
        "assert not diffusers.utils.is_kernels_available()\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, '__version__')\n"
        "assert [name for name in vars(kernels) if not name.startswith('__')] == [], vars(kernels)\n"
        "try:\n"
        "    from kernels import CUDAProperties\n"
        "    raise AssertionError('kernels.CUDAProperties exists')\n"
        "except ImportError:\n"
        "    pass\n"
        "import tofu_triton.kernels\n"
        "assert tofu_triton.kernels is not kernels\n"
        "assert tofu_triton.kernels.match.__name__ == 'tofu_triton.kernels.match'\n"
        "print(tofu_triton.kernels.__file__)\n"
    )
    result = _run_in_root(code, args=[str(tmp_path)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    import tofu_triton.kernels

    assert Path(result.stdout.strip()).resolve() == Path(tofu_triton.kernels.__file__).resolve()
