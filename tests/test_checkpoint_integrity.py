"""Checkpoint integrity: flipped bytes are caught by the checksums saved with every step, a
non-finite tree is never saved, a step saved before checksums existed still restores."""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from absl import logging as absl_logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import train_config

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax import train

absl_logging.set_verbosity(absl_logging.WARNING)


def _tiny(steps, cache_dir):
    c = train_config(steps=steps, **{"checkpoint.every_steps": 1})
    c.checkpoint.keep = 3
    c.compilation_cache_dir = cache_dir  # the resumed run loads the reference run's step
    return c


def _flip(path: str, count: int = 8) -> None:
    """Inverts `count` bytes in the middle of a file, in place (size unchanged)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        for i in range(mid, mid + count):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def _largest_data_file(step_dir: str, item: str) -> str:
    """The largest array-data file of an item: OCDBT keeps the array chunks in `d/` files."""
    files = glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """A 3-step single-device run (checkpoints at 1, 2, 3) and its losses."""
    base = tmp_path_factory.mktemp("integrity")
    wd, cache = str(base / "ref"), str(base / "jax_cache")
    hist = train.train(_tiny(3, cache), wd, devices=jax.devices()[:1])
    return wd, cache, [r["loss"] for r in hist]


@pytest.mark.slow  # two training runs
def test_flipped_bytes_in_params_and_opt_state_are_quarantined(undisturbed, tmp_path, caplog):
    wd, cache, ref = undisturbed
    work = str(tmp_path / "run")
    shutil.copytree(wd, work)
    os.remove(os.path.join(work, "metrics.jsonl"))
    ckdir = os.path.join(work, "checkpoints")
    _flip(_largest_data_file(os.path.join(ckdir, "3"), "params"))
    _flip(_largest_data_file(os.path.join(ckdir, "2"), "opt_state"))
    with caplog.at_level(logging.WARNING):
        hist = train.train(_tiny(3, cache), work, devices=jax.devices()[:1])
    # The run resumed from step 1, the newest intact step, and trains exactly as the
    # undisturbed run did.
    assert [r["step"] for r in hist] == [2, 3]
    assert [r["loss"] for r in hist] == ref[1:3]
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(lines) == 2, caplog.text
    q = os.path.join(work, ckpt_lib.QUARANTINE_DIR)
    for line, step, item in ((lines[0], 3, "params"), (lines[1], 2, "opt_state")):
        assert line.startswith(f"checkpoint step {step} in {ckdir} is damaged (")
        assert f"{ckdir}/{step}/{item}: array " in line and "does not match its checksum" in line
        assert f"moved it to {q}/{step}." in line and line.endswith("; resuming from step 1")
    names = sorted(os.listdir(q))
    assert [n.split(".")[0] for n in names if not n.endswith(".txt")] == ["2", "3"]
    # The steps saved after the resume carry checksums again and verify.
    assert ckpt_lib.read_params(work)[2] == 3


def _small_state(mesh):
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7
    params = {
        "a": {"kernel": jax.device_put(w, NamedSharding(mesh, P("data", None)))},
        "b": jax.device_put(np.ones(8, np.float32), NamedSharding(mesh, P())),
    }
    return params, optax.adamw(1e-3).init(params)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_non_finite_tree_is_never_saved(tmp_path):
    m = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _small_state(m)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
    ck.save(1, params, opt, {}, wait=True)
    bad = dict(params, b=params["b"].at[3].set(np.nan))
    with pytest.raises(ckpt_lib.NonFiniteCheckpointError) as e:
        ck.save(2, bad, opt, {}, wait=True)
    ckdir = os.path.join(str(tmp_path), "checkpoints")
    assert str(e.value) == (
        f"not saving step 2: params/b holds NaN or inf; the newest checkpoint in {ckdir} is"
        " still step 1"
    )
    # keep=1 would have rotated step 1 away had step 2 been written.
    assert ck.all_steps() == [1]
    opt_inf = jax.tree.map(lambda x: x * np.inf if x.dtype == np.float32 else x, opt)
    with pytest.raises(ckpt_lib.NonFiniteCheckpointError, match="opt_state/s"):
        ck.save(3, params, opt_inf, {}, wait=True)
    assert ck.all_steps() == [1]
    ck.close()


def test_step_without_checksums_restores_with_a_warning(tmp_path, caplog):
    """A step saved before checksums existed (its meta has none) restores, unverified."""
    m = shd.make_mesh(dict(data=8, fsdp=1, model=1))
    params, opt = _small_state(m)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ck.save(5, params, opt, {"seed": 3}, wait=True)
    ck.close()
    meta_files = glob.glob(os.path.join(str(tmp_path), "checkpoints", "5", "meta", "*"))
    meta_file = next(f for f in meta_files if "checksums" in open(f).read())
    meta = json.load(open(meta_file))
    del meta["checksums"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    with caplog.at_level(logging.WARNING):
        step, p2, _, meta2 = ck.restore_latest(_abstract(params), _abstract(opt))
    ck.close()
    assert step == 5 and meta2["seed"] == 3
    np.testing.assert_array_equal(np.asarray(p2["a"]["kernel"]), np.asarray(params["a"]["kernel"]))
    assert "has no checksums (saved by an older version)" in caplog.text


def test_checksum_sees_every_single_bit_flip():
    """Each of the 32 bits of one word, and of every word of an array, moves the checksum."""
    x = np.linspace(-3, 3, 48, dtype=np.float32).reshape(6, 8)
    ref = ckpt_lib._host_fingerprints({"p": {"x": x}})["p"]["x"]
    words = x.view(np.uint32)
    seen = set()
    for flat in (0, 17, 47):
        for bit in range(32):
            y = words.copy().reshape(-1)
            y[flat] ^= np.uint32(1 << bit)
            got = ckpt_lib._host_fingerprints({"p": {"x": y.view(np.float32).reshape(6, 8)}})
            assert got["p"]["x"] != ref, (flat, bit)
            seen.add(got["p"]["x"])
    assert len(seen) == 3 * 32  # and no two flips collide
    # Two words swapped (same multiset of values) are caught too: the sums weigh positions.
    y = x.copy().reshape(-1)
    y[[3, 4]] = y[[4, 3]]
    assert ckpt_lib._host_fingerprints({"p": {"x": y.reshape(6, 8)}})["p"]["x"] != ref
