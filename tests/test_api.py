"""The inference API end to end on the tiny random model of the reference fixtures.

`tests/fixtures/reference/tiny.json` describes random weights for the `tiny` preset (regenerated
here from their seeds and written as an HF safetensors directory); the reference logits and greedy
generations next to it were computed by the published PyTorch code.
"""

import json
import os
import zlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from qwenvl_jax import QwenVL
from qwenvl_jax import tokenizer as tk
from qwenvl_jax.api import checkpoint_kind

REF = os.path.join(os.path.dirname(__file__), "fixtures", "reference")


def _write_hf_dir(model_json: str, out: str) -> None:
    with open(model_json) as f:
        d = json.load(f)
    tensors = {}
    for r in d["recipe"]:
        rng = np.random.default_rng([d["seed"], zlib.crc32(r["key"].encode())])
        shape = tuple(r["shape"])
        tensors[r["key"]] = np.float32(r["mean"]) + np.float32(r["std"]) * rng.standard_normal(
            shape, dtype=np.float32
        )
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(d["hf_config"], f)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_hf")
    _write_hf_dir(os.path.join(REF, "tiny.json"), str(out))
    return str(out)


@pytest.fixture(scope="module")
def model(hf_dir):
    return QwenVL.from_pretrained(hf_dir, dtype="float32")


def _case(name):
    return np.load(os.path.join(REF, f"{name}.npz"))


# Relative error bound of the issue: max |ours - ref| <= 1e-4 * max |ref logit| (float32 both).
REL_TOL = 1e-4


@pytest.mark.parametrize("case", ["tiny_text", "tiny_image2"])
def test_logits_match_published(model, case, monkeypatch):
    monkeypatch.chdir(REF)  # the prompts name img_a.png / img_b.jpg relative to this directory
    f = _case(case)
    n = int(f["lengths"][0])
    ids = f["input_ids"][0, :n]
    text = model.tokenizer.decode(ids)
    logits = model.logits(text)
    assert logits.shape == (n, model.config.vocab_size) and logits.dtype == np.float32
    err = np.abs(logits[:, f["sampled_columns"]] - f["logits_sampled"][0, :n]).max()
    assert err <= REL_TOL * f["max_abs_logit"], err
    np.testing.assert_array_equal(model.logits(ids), logits)  # ids and text agree


def test_bad_inputs_give_clear_errors(model, tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.logits(f"Picture 1: <img>{missing}</img>\nhi")
    with pytest.raises(ValueError, match="Unclosed image token"):
        model.logits("Picture 1: <img>a.png\nhi")
    long_path = "/x/" + "p" * 300 + ".png"
    with pytest.raises(ValueError, match=r"over 255|more than 255"):
        model.logits(f"<img>{long_path}</img>")
    with pytest.raises(ValueError, match="empty"):
        model.logits("")
    with pytest.raises(ValueError, match="allow_urls"):
        model.logits("<img>https://example.com/a.png</img>")


def test_save_pretrained_round_trip(model, tmp_path, monkeypatch):
    out = tmp_path / "export"
    model.save_pretrained(str(out))
    assert checkpoint_kind(str(out)) == "hf"
    assert (out / "qwen.tiktoken").exists() and (out / "tokenizer_config.json").exists()
    again = QwenVL.from_pretrained(str(out))
    assert isinstance(again.tokenizer, tk.QWenTokenizer)
    text = "你好, world 123"
    np.testing.assert_array_equal(again.logits(text), model.logits(text))
    ours = tmp_path / "ours"
    model.save(str(ours))
    assert checkpoint_kind(str(ours)) == "ours"
    np.testing.assert_array_equal(
        QwenVL.from_pretrained(str(ours)).logits(text), model.logits(text)
    )


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Qwen-VL checkpoint"):
        QwenVL.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothere"):
        QwenVL.from_pretrained(str(tmp_path / "nothere"))
    with pytest.raises(ValueError, match="unsupported dtype"):
        QwenVL.from_pretrained(str(tmp_path), dtype="int8")
