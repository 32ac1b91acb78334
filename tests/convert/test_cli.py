"""The convert command line: each user mistake is one line `error: ...` on stderr and exit code 2;
`export` of a training workdir (its latest step or --step) gives exactly the trained parameters.

Every case runs the real `python -m qwenvl_jax.convert` in a subprocess against the tiny bf16
checkpoint tests/fixtures/reference/bin_mini (written by the published PyTorch code), small
directories derived from it, or a tiny model trained 2 steps by the trainer's Python API.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from paths import FIXTURES
from tiny import train_config

from qwenvl_jax.convert import hf_tensors, import_hf, save_params, tensor_io

BIN_MINI = os.path.join(FIXTURES, "reference", "bin_mini")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def convert(*args):
    """Run the CLI; (exit code, stdout, stderr)."""
    r = subprocess.run(
        [sys.executable, "-m", "qwenvl_jax.convert", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(result, *words):
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Broken and valid checkpoint directories, built once (see each key)."""
    root = tmp_path_factory.mktemp("cli")
    cfg, params = import_hf(BIN_MINI)
    weights = dict(hf_tensors(params, cfg))  # bf16, HF layout
    d = {}

    def hf_dir(name, tensors):
        path = root / name
        path.mkdir()
        shutil.copy(os.path.join(BIN_MINI, "config.json"), path)
        if tensors is not None:
            tensor_io.save_safetensors(str(path / "model.safetensors"), tensors)
        d[name] = path
        return path

    hf_dir("no_shards", None)
    (hf_dir("junk_shard", None) / "model.safetensors").write_bytes(b"not a safetensors file")
    hf_dir("missing_key", {k: v for k, v in weights.items() if k != "lm_head.weight"})
    hf_dir("extra_key", dict(weights, **{"transformer.extra.weight": np.zeros(3, np.float32)}))
    bad = dict(weights)
    bad["transformer.ln_f.weight"] = np.zeros(3, weights["transformer.ln_f.weight"].dtype)
    hf_dir("bad_shape", bad)
    (hf_dir("bad_config", {}) / "config.json").write_text("{not json")
    no_cfg = root / "no_config"
    shutil.copytree(BIN_MINI, no_cfg)
    os.remove(no_cfg / "config.json")
    d["no_config"] = no_cfg
    (root / "empty").mkdir()
    d["empty"] = root / "empty"
    save_params(str(root / "ours"), params, cfg)
    d["ours"] = root / "ours"
    (root / "workdir" / "checkpoints").mkdir(parents=True)
    d["workdir"] = root / "workdir"
    (root / "not_ckpt").mkdir()
    (root / "not_ckpt" / "notes.txt").write_text("hello")
    d["not_ckpt"] = root / "not_ckpt"
    d["root"] = root
    return d


def test_import_source_mistakes(dirs, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(convert("import", "/does/not/exist", out), "/does/not/exist", "not exist")
    shard = os.path.join(BIN_MINI, "pytorch_model-00001-of-00004.bin")
    assert_one_line_error(convert("import", shard, out), shard, "is a file", "directory")
    assert_one_line_error(convert("import", dirs["no_config"], out), "no config.json")
    assert_one_line_error(
        convert("import", dirs["bad_config"], out), "config.json", "not valid JSON"
    )
    assert_one_line_error(
        convert("import", dirs["no_shards"], out), "no Qwen-VL weights", "model*.safetensors"
    )
    assert_one_line_error(convert("import", dirs["empty"], out), "no config.json")
    assert_one_line_error(
        convert("import", dirs["junk_shard"], out), "model.safetensors", "not a readable"
    )
    assert_one_line_error(
        convert("import", dirs["ours"], out), "already a qwenvl_jax checkpoint", "params/"
    )
    assert_one_line_error(convert("import", dirs["workdir"], out), "training workdir", "export")
    assert not out.exists()


def test_import_key_mistakes(dirs, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(
        convert("import", dirs["missing_key"], out), "missing key 'lm_head.weight'"
    )
    assert_one_line_error(
        convert("import", dirs["extra_key"], out), "unexpected key 'transformer.extra.weight'"
    )
    assert_one_line_error(
        convert("import", dirs["bad_shape"], out), "'transformer.ln_f.weight'", "has shape (3,)"
    )
    assert not out.exists()


def test_flag_and_output_mistakes(dirs, tmp_path):
    line = assert_one_line_error(
        convert("export", dirs["ours"], tmp_path / "a", "--dtype", "fp8"), "--dtype", "'fp8'"
    )
    assert all(d in line for d in ("keep", "float32", "bfloat16", "float16"))
    assert_one_line_error(
        convert("export", dirs["ours"], tmp_path / "b", "--max_shard_size", "2XB"),
        "--max_shard_size",
        "'2XB'",
        "GiB",
    )
    assert_one_line_error(
        convert("export", dirs["ours"], tmp_path / "c", "--max_shard_size", "0"), "not a size"
    )
    assert_one_line_error(convert("import", BIN_MINI), "required", "out")
    assert_one_line_error(convert("convert", BIN_MINI, tmp_path), "invalid choice", "export")
    assert_one_line_error(convert("import", BIN_MINI, dirs["ours"]), "already holds params/")
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(convert("export", dirs["ours"], f), "is a file")
    assert_one_line_error(
        convert("export", dirs["ours"], tmp_path / "d", "--code_dir", tmp_path / "nowhere"),
        "--code_dir",
        "no .py files",
    )
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_export_source_mistakes(dirs, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(convert("export", "/does/not/exist", out), "does not exist")
    assert_one_line_error(convert("export", BIN_MINI, out), "HF checkpoint", "import")
    assert_one_line_error(
        convert("export", dirs["not_ckpt"], out), "params/", "checkpoints/<step>/", "notes.txt"
    )
    assert_one_line_error(convert("export", dirs["empty"], out), "holds nothing")
    assert not out.exists()


def test_tower_source_mistakes(dirs, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(convert("import-llm", "/does/not/exist", out), "does not exist")
    shard = os.path.join(BIN_MINI, "pytorch_model-00001-of-00004.bin")
    assert_one_line_error(convert("import-llm", shard, out), "is a file", "Qwen-7B directory")
    assert_one_line_error(convert("import-llm", dirs["no_config"], out), "no config.json")
    assert_one_line_error(
        convert("import-llm", BIN_MINI, out), "'visual' section", "convert import"
    )
    assert_one_line_error(convert("import-vit", "/does/not/exist", out), "does not exist")
    assert_one_line_error(convert("import-vit", dirs["empty"], out), "open_clip")
    assert_one_line_error(
        convert("import-vit", dirs["junk_shard"] / "model.safetensors", out), "not a readable"
    )
    assert not out.exists()


def test_damaged_ours_is_one_line(dirs, tmp_path):
    broken = tmp_path / "ours"
    shutil.copytree(dirs["ours"], broken)
    for root, _, files in os.walk(broken / "params"):
        for f in files:
            if f != "_CHECKPOINT_METADATA":
                os.remove(os.path.join(root, f))
    assert_one_line_error(convert("export", broken, tmp_path / "out"), "Orbax cannot restore")


# ----------------------------------------------------------------------------- training workdir
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps on random batches; checkpoints at steps 1 and 2."""
    import jax

    from qwenvl_jax import train as train_lib

    c = train_config(steps=2, checkpoint__every_steps=1)
    wd = tmp_path_factory.mktemp("run")
    train_lib.train(c, str(wd), devices=jax.devices()[:1])
    return wd


def _hf(params, cfg) -> dict:
    return {k: np.asarray(v) for k, v in hf_tensors(params, cfg)}


def test_export_training_workdir(trained, tmp_path):
    from qwenvl_jax import checkpoint

    # The trainer's own reader gives the reference: the latest step, and step 1 from a copy of
    # the workdir without step 2.
    cfg, last = checkpoint.latest_params(str(trained))
    first_wd = tmp_path / "first"
    shutil.copytree(trained, first_wd)
    shutil.rmtree(first_wd / "checkpoints" / "2")
    _, first = checkpoint.latest_params(str(first_wd))
    want = {2: _hf(last, cfg), 1: _hf(first, cfg)}
    assert any(not np.array_equal(want[1][k], want[2][k]) for k in want[1])  # training moved them

    for step, extra in ((2, ()), (1, ("--step", "1")), (2, ("--step", "2"))):
        out = tmp_path / f"hf{step}{len(extra)}"
        code, stdout, err = convert("export", trained, out, "--no_tokenizer", *extra)
        assert code == 0, err[-3000:]
        assert f"read step {step}" in stdout
        cfg2, params = import_hf(str(out))
        assert cfg2 == cfg
        got = _hf(params, cfg)
        assert list(got) == list(want[step])
        for k, v in want[step].items():
            assert got[k].dtype == v.dtype, k
            np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_export_training_workdir_mistakes(trained, dirs, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(convert("export", trained, out, "--step", "7"), "no step 7", "[1, 2]")
    assert_one_line_error(convert("export", trained, out, "--step", "-1"), "--step", "'-1'")
    assert_one_line_error(
        convert("export", dirs["ours"], out, "--step", "1"), "--step 1", "training workdir"
    )
    assert_one_line_error(
        convert("export", dirs["workdir"], out), "training workdir", "without a complete"
    )
    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(trained, no_cfg)
    os.remove(no_cfg / "config.json")
    assert_one_line_error(convert("export", no_cfg, out), "without config.json")
    assert not out.exists()
