"""Packaging for dsunlearn: the `dsunlearn` package plus the `kernels` Triton ops."""

from setuptools import find_packages, setup

# Versions known to work together (torch 2.13.0 is installed first by the Makefile).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "transformers==5.23.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "pyarrow==26.0.1",
    "triton==3.9.0",
    "safetensors>=0.6",
    "numpy>=1.26",
    "pillow>=10.0",
    "pyyaml>=6.0",
    "rich>=13.0",
    "matplotlib>=3.8",
    "scipy>=1.11",
    "tensorboard>=2.15",
    "optuna>=4.0",
    "psutil>=5.9",
]

# audit's quantization attack rounds through torchao's affine primitives when it is installed,
# else through the same arithmetic in plain torch (tested equal). Optional: once installed,
# transformers imports it in every process (0.5 s and a screen of warnings per rank).
QUANT = ["torchao==0.18.0"]

# report_to=[wandb]: offline runs; reinit="create_new" (a fresh run per open) needs 0.19.10.
# About 22 MB of wheels (wandb's own 20 MB, with its wandb-core binary) and 20 small packages.
TRACKING = ["wandb>=0.19.10"]

EXTRAS_REQUIRE = {
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff==0.17.6", *TRACKING],
    "gpu": ["flash-attn>=2.6", "liger-kernel>=0.6"],
    "tracking": TRACKING,
    "quant": QUANT,
}

setup(
    name="dsunlearn",
    version="0.1.0",
    description="Distributed visual-concept unlearning for multimodal LLMs on DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=find_packages(include=["dsunlearn", "dsunlearn.*", "kernels", "kernels.*"]),
    package_data={"dsunlearn": ["configs/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["dsunlearn=dsunlearn.cli:entry"]},
)
