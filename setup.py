"""Packaging for gwtn_dist.

The top-level ``kernels/`` folder is installed as ``gwtn_dist.kernels``: the PyPI name
``kernels`` belongs to another project, so it must never be importable as a top-level package.

torch is a range, not a pin: the code uses nothing newer than torch 2.0's APIs
(scaled_dot_product_attention, torch.load(weights_only=True), channels_last), 2.4 is the floor
we state, and 2.13.0 is what the tests run on (the README's set-up installs that CPU build
first, so pip does not pull a CUDA build).
"""

from setuptools import setup

KERNEL_PACKAGES = ["gwtn_dist.kernels", "gwtn_dist.kernels.imitation", "gwtn_dist.kernels.bench"]

setup(
    name="gwtn_dist",
    version="0.1.0",
    description='"Go Wide, Then Narrow": train deep thin networks by imitating a wide twin.',
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "gwtn_dist",
        "gwtn_dist.models",
        "gwtn_dist.data",
        "gwtn_dist.distributed",
        "gwtn_dist.stages",
        *KERNEL_PACKAGES,
    ],
    package_dir={
        "gwtn_dist.kernels": "kernels",
        "gwtn_dist.kernels.imitation": "kernels/imitation",
    },
    install_requires=[
        "torch>=2.4,<3",
        "triton",
        "deepspeed>=0.19",
        "webdataset>=1.0",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={
        # transformers only checks the BERT export round trip (it does not pull torch in).
        "hf": ["transformers", "safetensors"],
        # Optional dashboards for the metrics records (logging.tensorboard, logging.wandb).
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "test": ["pytest", "ruff", "transformers", "safetensors"],
        "dev": ["pytest", "ruff", "transformers"],
    },
    entry_points={"console_scripts": ["gwtn = gwtn_dist.cli:main"]},
)
