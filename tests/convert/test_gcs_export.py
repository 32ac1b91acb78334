"""`convert export` between a training workdir and an HF directory, either end in gs://.

A tiny model trained 2 steps locally is copied into the emulator's bucket (tests/gcs_emulator.py);
`python -m qwenvl_jax.convert export` (its importable main, the same flags) then exports it
gs:// -> gs://, gs:// -> local and local -> gs://, and each export reloads through our HF
importer to exactly the trained parameters (read from the local workdir by the trainer's reader).
"""

import os

import jax
import numpy as np
import pytest
from tiny import train_config

from qwenvl_jax import checkpoint, fileio
from qwenvl_jax.convert import hf_tensors, import_hf
from qwenvl_jax.convert.__main__ import main as convert_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps on random batches (local workdir), and its HF tensors."""
    from qwenvl_jax import train as train_lib

    c = train_config(steps=2)
    wd = str(tmp_path_factory.mktemp("run"))
    train_lib.train(c, wd, devices=jax.devices()[:1])
    cfg, params = checkpoint.latest_params(wd)
    return wd, cfg, {k: np.asarray(v) for k, v in hf_tensors(params, cfg)}


def _check_export(out, cfg, want, tmp_path):
    """`out` (local or gs://) holds an HF export equal to `want`."""
    local = out
    if fileio.is_remote(out):
        local = str(tmp_path / "downloaded")
        fileio.copy_tree(out, local)
    got_cfg, params = import_hf(local)
    assert got_cfg == cfg
    got = {k: np.asarray(v) for k, v in hf_tensors(params, cfg)}
    assert list(got) == list(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.slow
def test_export_gs_workdir_to_gs(gcs, trained, tmp_path):  # noqa: F811
    wd, cfg, want = trained
    gs_wd = f"gs://{gcs.bucket}/export/wd"
    fileio.copy_tree(wd, gs_wd)
    out = f"gs://{gcs.bucket}/export/hf"
    # 1 MB shards (the model has 9 MB): each shard is staged and uploaded on its own.
    assert convert_main(["export", gs_wd, out, "--max_shard_size", "1MB"]) == 0
    names = fileio.listdir(out)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert (
        len(shards) > 2
        and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    )
    assert sorted(set(names) - set(shards)) == [
        "config.json", "generation_config.json", "model.safetensors.index.json",
        "qwen.tiktoken", "tokenizer_config.json",
    ]  # fmt: skip
    _check_export(out, cfg, want, tmp_path)
    assert not os.path.exists("gs:")  # nothing written to a local directory named "gs:"


@pytest.mark.slow
def test_export_gs_workdir_to_local_and_local_workdir_to_gs(gcs, trained, tmp_path):  # noqa: F811
    wd, cfg, want = trained
    gs_wd = f"gs://{gcs.bucket}/export/wd2"
    fileio.copy_tree(wd, gs_wd)
    local_out = str(tmp_path / "hf_local")
    assert convert_main(["export", gs_wd, local_out, "--no_tokenizer"]) == 0
    _check_export(local_out, cfg, want, tmp_path)
    gs_out = f"gs://{gcs.bucket}/export/hf_from_local"
    assert convert_main(["export", wd, gs_out, "--no_tokenizer"]) == 0
    _check_export(gs_out, cfg, want, tmp_path)


def test_export_missing_gs_workdir_is_one_line(gcs, tmp_path, capsys):  # noqa: F811
    src = f"gs://{gcs.bucket}/no/such/run"
    assert convert_main(["export", src, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: export: {src} does not exist"], err
