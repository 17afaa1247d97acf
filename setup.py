"""Packaging for gwtn_dist.

The top-level ``kernels/`` folder is installed as ``gwtn_dist.kernels``: the PyPI name
``kernels`` belongs to another project, so it must never be importable as a top-level package.

torch is a range, not a pin, and its floor is the oldest torch the tests passed on: 2.13.0.
Tried at 2.4.1 (with its triton 3.0.0): the models, BERT and CPU training runs (one process,
and two ranks under DeepSpeed) passed, but the Triton imitation kernels fail on first use (they
read ``triton.knobs``: triton >= 3.4, which torch >= 2.8 brings; ``loss_backend: auto`` picks
them on CUDA), and the test extra's transformers 5 refuses torch < 2.6. Versions between were
not tried. The pin lives in ./setup.sh (TORCH_SPEC), which
installs torch first, from the index it is told (TORCH_INDEX_URL: the CPU or a CUDA build), and
keeps a torch in this range that is already there (a cluster's or container's).
"""

from setuptools import find_packages, setup

KERNEL_PACKAGES = ["gwtn_dist.kernels", "gwtn_dist.kernels.imitation"]

setup(
    name="gwtn_dist",
    version="0.1.0",
    description='"Go Wide, Then Narrow": train deep thin networks by imitating a wide twin.',
    license="MIT",
    python_requires=">=3.10",
    # Found, not listed: a listed package list once left out models/resnet and models/bert,
    # so a wheel could not build a model.
    packages=[*find_packages(include=["gwtn_dist", "gwtn_dist.*"]), *KERNEL_PACKAGES],
    package_dir={
        "gwtn_dist.kernels": "kernels",
        "gwtn_dist.kernels.imitation": "kernels/imitation",
    },
    install_requires=[
        # No triton line: a CUDA build of torch requires the triton it was built with, and a
        # second, unpinned line could install another; ./setup.sh adds one to a CPU build.
        "torch>=2.13,<3",
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
        # tensorboard: the suite checks that every metrics record reaches its event files,
        # and under CI=true a missing package fails that test instead of skipping it.
        "test": ["pytest", "ruff", "transformers", "safetensors", "tensorboard"],
        "dev": ["pytest", "ruff", "transformers"],
    },
    entry_points={"console_scripts": ["gwtn = gwtn_dist.cli:main"]},
)
