"""The weights of the reference fixture models (tests/fixtures/reference/<name>.json).

tools/make_reference_fixtures.py stores a seeded recipe per tensor instead of the weights; the tests
regenerate them here and check each against the sha256 that the reference run recorded, so a
fixture and the weights the published code saw cannot drift apart silently.
"""

import hashlib
import json
import os
import zlib

import numpy as np
from safetensors.numpy import save_file

from qwenvl_jax import config as config_lib

REF = os.path.join(os.path.dirname(__file__), "fixtures", "reference")


def recipe_array(seed: int, entry: dict) -> np.ndarray:
    """A fixture weight, regenerated as tools/make_reference_fixtures.py documents it."""
    rng = np.random.default_rng([seed, zlib.crc32(entry["key"].encode())])
    x = rng.standard_normal(tuple(entry["shape"]), dtype=np.float32)
    return (np.float32(entry["mean"]) + np.float32(entry["std"]) * x).astype(np.float32)


def _load(name: str) -> dict:
    with open(os.path.join(REF, f"{name}.json")) as f:
        return json.load(f)


def _checked_tensors(d: dict, name: str):
    for e in d["recipe"]:
        a = recipe_array(d["seed"], e)
        if hashlib.sha256(a.tobytes()).hexdigest() != e["sha256"]:
            raise AssertionError(f"regenerated {e['key']} differs from the reference's weights")
        yield e["key"], a, f"{name} recipe"


def reference_tensors(name: str):
    """(config, iterator of (hf_key, float32 array, source)) of fixture model `name`."""
    d = _load(name)
    return config_lib.from_hf_dict(d["hf_config"]), _checked_tensors(d, name)


def write_hf_dir(name: str, out: str) -> None:
    """Fixture model `name` as an HF directory: model.safetensors and config.json."""
    d = _load(name)
    save_file(
        {k: a for k, a, _ in _checked_tensors(d, name)}, os.path.join(out, "model.safetensors")
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(d["hf_config"], f)
