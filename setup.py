"""prima_jax: PRIMA (multi-image pixel-grounded reasoning) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="prima_jax",
    version="0.1.0",
    license="Apache-2.0",
    description="PRIMA multi-image reasoning segmentation in JAX / Flax NNX",
    python_requires=">=3.11",
    packages=find_packages(include=["prima_jax", "prima_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "numpy>=2.0",
        "ml-collections>=1.1.0",
        "absl-py",
        "pillow",
        "pycocotools>=2.0.11",
        "pyarrow",
        "tokenizers",
        "sentencepiece",
        "tensorboardX>=2.6.5",   # TensorBoard event files of training runs
        "tqdm",                  # progress bars of long jobs
    ],
    extras_require={
        # PyTorch export / import and parity references.
        "torch": ["torch>=2.13.0", "transformers>=5.24.0", "safetensors>=0.8.0", "peft>=0.21.2"],
        # The web demo (python -m prima_jax.demo).
        "demo": ["gradio>=6.31.0"],
        # tensorboard: its EventAccumulator reads the training event files back in the tests;
        # segment-anything: the original SAM modelling code, the reference for the SAM key layout;
        # gradio + playwright: the web demo driven in a headless Chromium (Debian's, not downloaded);
        # pytest-xdist: the suite runs on two worker processes (pyproject.toml).
        "test": ["pytest>=9.0", "pytest-xdist>=3.8", "ruff>=0.14", "tensorboard>=2.21.0",
                 "segment-anything>=1.0", "gradio>=6.31.0", "playwright>=1.65.3"],
        # Object-store workdirs and data: gs:// (epath's fsspec client, and Orbax's bucket queries).
        "gcs": ["gcsfs", "google-cloud-storage"],
        "s3": ["s3fs"],
    },
)
