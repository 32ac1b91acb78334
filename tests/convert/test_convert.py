"""Checkpoint conversion: key accounting, .bin/safetensors reading, bit-exact round trips, errors.

Golden data: tests/fixtures/reference/bin_mini (a bf16 checkpoint written by the published PyTorch
code's save_pretrained), bin_dtypes.bin (torch.save), and the published Qwen-VL-Chat weight index
(tests/fixtures/qwen_vl_chat_index_keys.json). See tests/fixtures/reference/README.md.
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from paths import FIXTURES
from reference_weights import reference_tensors

from qwenvl_jax import config as config_lib
from qwenvl_jax.convert import (
    StateDictMismatchError,
    TensorFileError,
    UnsupportedDtypeError,
    check_params,
    export_hf,
    hf_shapes,
    hf_tensors,
    import_hf,
    import_tensors,
    load_params,
    save_params,
    tensor_io,
)
from qwenvl_jax.tree import TreeMismatchError

REF = os.path.join(FIXTURES, "reference")
BIN_MINI = os.path.join(REF, "bin_mini")


@pytest.fixture(scope="module")
def mini():
    cfg, tensors = reference_tensors("bin_mini")
    return cfg, {key: a for key, a, _ in tensors}


def bits(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def same_hf(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(bits(a[k]), bits(b[k]), err_msg=k)


# ----------------------------------------------------------------------------- key accounting
def test_7b_key_set_and_shapes_equal_published_index():
    """The qwen-vl-7b preset exports exactly the 853 keys of the published index, sizes included.

    The model side is computed abstractly (nnx.eval_shape allocates nothing).
    """
    from flax import nnx

    from qwenvl_jax.model.options import ModelOptions
    from qwenvl_jax.model.qwenvl import QWenLMHeadModel

    with open(os.path.join(FIXTURES, "qwen_vl_chat_index_keys.json")) as f:
        index = json.load(f)
    cfg = config_lib.get_preset("qwen-vl-7b")
    shapes = hf_shapes(cfg)
    assert len(index["keys"]) == 853
    assert set(shapes) == set(index["keys"])
    assert len(shapes) == 853
    # bf16: 2 bytes per parameter; the index's total_size is the byte size of all tensors.
    assert sum(int(np.prod(s)) for s in shapes.values()) * 2 == index["total_size"]
    assert shapes["transformer.visual.transformer.resblocks.0.attn.in_proj.weight"] == (4992, 1664)
    assert shapes["transformer.h.0.mlp.w2.weight"] == (11008, 4096)
    for scan in (False, True):
        model = nnx.eval_shape(
            lambda scan=scan: QWenLMHeadModel(cfg, ModelOptions(scan_layers=scan), rngs=nnx.Rngs(0))
        )
        abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        check_params(abstract, cfg)  # every model leaf has exactly one HF key, shapes agree
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
        assert n == 9_656_935_168


def test_key_order_matches_reference_state_dict():
    """Our HF key list is the reference state_dict() order (recorded by the fixture script)."""
    for name in ("tiny", "wide224", "bin_mini"):
        with open(os.path.join(REF, f"{name}.json")) as f:
            d = json.load(f)
        cfg = config_lib.from_hf_dict(d["hf_config"])
        got = hf_shapes(cfg)
        assert list(got) == [e["key"] for e in d["recipe"]], name
        assert [list(s) for s in got.values()] == [e["shape"] for e in d["recipe"]], name


# ----------------------------------------------------------------------------- .bin reading
def test_bin_checkpoint_written_by_reference(mini):
    """The reference's sharded bf16 .bin checkpoint imports to exactly the recipe weights."""
    cfg, weights = mini
    lines = []
    got_cfg, params = import_hf(BIN_MINI, progress=lines.append)
    assert got_cfg == cfg
    assert len(lines) == 4 and all("pytorch_model-0000" in line for line in lines)
    hf = dict(hf_tensors(params, cfg))
    assert list(hf) == list(weights)
    for k, w in weights.items():
        assert hf[k].dtype == ml_dtypes.bfloat16, k
        # torch and ml_dtypes both round float32 -> bf16 to nearest-even.
        np.testing.assert_array_equal(bits(hf[k]), bits(w.astype(ml_dtypes.bfloat16)), err_msg=k)


def test_bin_dtypes_and_layouts():
    expected = np.load(os.path.join(REF, "bin_dtypes_expected.npz"))
    got = dict(tensor_io.iter_torch_bin(os.path.join(REF, "bin_dtypes.bin")))
    assert set(got) == set(expected.files)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["f16"].dtype == np.float16
    assert got["f32_transposed"].shape == (6, 4) and got["bf16_scalar"].shape == ()
    for k in expected.files:
        np.testing.assert_array_equal(got[k].astype(np.float32), expected[k], err_msg=k)


def test_bin_unsupported_dtype_names_tensor():
    with pytest.raises(UnsupportedDtypeError, match=r"'ids'.*int64"):
        dict(tensor_io.iter_torch_bin(os.path.join(REF, "bin_int64.bin")))


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def test_bin_refuses_code_in_pickle(tmp_path):
    """A pickle that would call os.system is refused before anything runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    _zip_with_pickle(path, pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(TensorFileError, match=r"refusing to unpickle (posix|os)\.system"):
        tensor_io.read_torch_bin(str(path))
    assert not marker.exists()


def test_bin_legacy_and_non_state_dict(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(TensorFileError, match="legacy"):
        tensor_io.read_torch_bin(str(legacy))
    notdict = tmp_path / "list.bin"
    _zip_with_pickle(notdict, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(TensorFileError, match="not a state dict"):
        tensor_io.read_torch_bin(str(notdict))


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_write_read(tmp_path):
    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": (np.arange(5, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16),
        "c": np.ones((0, 4), np.float16),
        "t": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    }
    path = str(tmp_path / "x.safetensors")
    assert tensor_io.save_safetensors(path, arrays) == sum(a.nbytes for a in arrays.values())
    got = dict(tensor_io.iter_safetensors(path))
    assert set(got) == set(arrays)
    same_hf({k: arrays[k] for k in got}, got)  # bf16 stays bf16, bit for bit
    assert tensor_io.safetensors_shapes(path) == {k: a.shape for k, a in got.items()}
    with pytest.raises(UnsupportedDtypeError, match=r"'i'.*int32"):
        tensor_io.save_safetensors(str(tmp_path / "i.safetensors"), {"i": np.ones(2, np.int32)})


def test_safetensors_raw_fallback_is_bit_exact(tmp_path):
    """The path for a safetensors release without numpy bf16 gives the same arrays."""
    arrays = {
        "b": (np.arange(7, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16).reshape(7, 1),
        "f": np.arange(3, dtype=np.float16),
    }
    path = str(tmp_path / "x.safetensors")
    tensor_io.save_safetensors(path, arrays)
    raw = tensor_io._raw_tensors(path)  # in no particular order
    assert set(raw) == set(arrays)
    same_hf(arrays, {k: raw[k] for k in arrays})


def test_safetensors_truncated_or_corrupt_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tensor_io.save_safetensors(str(path), {"w": np.ones((4, 4), np.float32)})
    raw = path.read_bytes()
    for name, data in (("cut.safetensors", raw[:-5]), ("junk.safetensors", b"not a checkpoint")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TensorFileError, match=name):
            dict(tensor_io.iter_safetensors(str(tmp_path / name)))


def test_safetensors_unsupported_dtype(tmp_path, mini):
    cfg, weights = mini
    path = tmp_path / "model.safetensors"
    from safetensors.numpy import save_file

    save_file(
        {"transformer.wte.weight": weights["transformer.wte.weight"].astype(np.float64)}, path
    )
    with pytest.raises(UnsupportedDtypeError, match=r"transformer\.wte\.weight.*F64"):
        import_hf(str(path), config=cfg)


def test_bin_truncated_names_the_file(tmp_path):
    raw = open(os.path.join(REF, "bin_dtypes.bin"), "rb").read()
    for n in (len(raw) // 2, len(raw) - 200):
        path = tmp_path / f"cut{n}.bin"
        path.write_bytes(raw[:n])
        with pytest.raises(TensorFileError, match=f"{path.name}: a truncated"):
            dict(tensor_io.iter_torch_bin(str(path)))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_bit_exact(tmp_path, mini, scan_layers):
    """bf16 .bin -> ours -> HF safetensors -> ours -> Orbax -> ours -> HF: every bit the same."""
    cfg, _ = mini
    _, params = import_hf(BIN_MINI, scan_layers=scan_layers)
    ref = dict(hf_tensors(params, cfg))
    out1 = tmp_path / "hf1"
    written = export_hf(params, cfg, str(out1), max_shard_bytes=200_000, tokenizer=None)
    assert sum(p.endswith(".safetensors") for p in written) > 1
    cfg2, params2 = import_hf(str(out1), scan_layers=not scan_layers)
    assert cfg2 == cfg
    same_hf(ref, dict(hf_tensors(params2, cfg)))
    save_params(str(tmp_path / "ours"), params2, cfg)
    cfg3, params3 = load_params(str(tmp_path / "ours"), scan_layers=scan_layers)
    assert cfg3 == cfg
    same_hf(ref, dict(hf_tensors(params3, cfg)))
    out2 = tmp_path / "hf2"
    export_hf(params3, cfg, str(out2), max_shard_bytes=200_000, tokenizer=None)
    for f in sorted(os.listdir(out1)):
        assert (out1 / f).read_bytes() == (out2 / f).read_bytes(), f


def test_export_files(tmp_path, mini):
    cfg, weights = mini
    params = import_tensors(((k, v, "mem") for k, v in weights.items()), cfg)
    out = tmp_path / "hf"
    export_hf(params, cfg, str(out))
    names = set(os.listdir(out))
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "qwen.tiktoken",
        "tokenizer_config.json",
    } <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(weights)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())
    conf = json.loads((out / "config.json").read_text())
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert config_lib.from_hf_dict(conf) == cfg
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["top_p"], gen["top_k"], gen["chat_format"]) == (0.3, 0, "chatml")
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["max_window_size"]) == (151643,) * 2 + (
        6144,
    )
    # float32 in, float32 out, unchanged values.
    shard = str(out / index["weight_map"]["lm_head.weight"])
    got = dict(tensor_io.iter_safetensors(shard))
    np.testing.assert_array_equal(got["lm_head.weight"], weights["lm_head.weight"])
    # Safetensors metadata "format": "pt" is what transformers requires to load the shards.
    raw = (out / index["weight_map"]["lm_head.weight"]).read_bytes()
    assert b'"__metadata__":{"format":"pt"}' in raw[:4096]
    # Every file with the mode open() gives (safetensors alone leaves its shards 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert {n: oct(os.stat(out / n).st_mode & 0o777) for n in names} == {
        n: oct(0o666 & ~umask) for n in names
    }


# ----------------------------------------------------------------------------- errors
def test_missing_extra_duplicate_and_misshaped_keys(mini):
    cfg, weights = mini
    items = list(weights.items())

    def run(pairs):
        return import_tensors(((k, v, "shard.safetensors") for k, v in pairs), cfg)

    with pytest.raises(StateDictMismatchError, match=r"missing key 'transformer\.h\.1\.mlp\.w2"):
        run([(k, v) for k, v in items if k != "transformer.h.1.mlp.w2.weight"])
    with pytest.raises(StateDictMismatchError, match=r"unexpected key 'transformer\.h\.2\.ln_1"):
        run(items + [("transformer.h.2.ln_1.weight", np.ones(cfg.hidden_size, np.float32))])
    with pytest.raises(StateDictMismatchError, match=r"'lm_head\.weight' appears twice"):
        run(items + [("lm_head.weight", weights["lm_head.weight"])])
    bad = dict(weights)
    bad["transformer.visual.proj"] = np.zeros((4, 4), np.float32)
    with pytest.raises(
        StateDictMismatchError, match=r"'transformer\.visual\.proj' in shard.safetensors has shape"
    ):
        run(bad.items())
    # Non-parameter buffers the reference itself ignores are accepted and dropped.
    run(items + [("transformer.h.0.attn.rotary_emb.inv_freq", np.ones(4, np.float32))])


def test_export_rejects_wrong_params(tmp_path, mini):
    cfg, weights = mini
    params = import_tensors(((k, v, "mem") for k, v in weights.items()), cfg)
    want = params["transformer"]["visual"]["proj"].shape
    params["transformer"]["visual"]["proj"] = np.zeros((3, 3), np.float32)
    with pytest.raises(
        TreeMismatchError,
        match=rf"^parameters: does not fit the config: 1 mis-shaped \(first transformer\.visual"
        rf"\.proj: \(3, 3\) vs the config's \({want[0]}, {want[1]}\)\)$",
    ):
        export_hf(params, cfg, str(tmp_path / "a"), tokenizer=None)
    assert not (tmp_path / "a").exists()  # checked before anything is written
    params = import_tensors(((k, v, "mem") for k, v in weights.items()), cfg)
    params["transformer"]["extra"] = {"kernel": np.zeros(3)}
    with pytest.raises(
        TreeMismatchError,
        match=r"^parameters: does not fit the config: 1 unexpected \(first transformer\.extra"
        r"\.kernel\)$",
    ):
        export_hf(params, cfg, str(tmp_path / "b"), tokenizer=None)


def test_missing_shard_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no Qwen-VL weights"):
        import_hf(str(tmp_path), config=config_lib.get_preset("tiny"))
    (tmp_path / "config.json").write_text(open(os.path.join(BIN_MINI, "config.json")).read())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        import_hf(str(tmp_path))


# ----------------------------------------------------------------------------- command line
def test_cli_import_export(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ours, hf = tmp_path / "ours", tmp_path / "hf"
    cmd = [sys.executable, "-m", "qwenvl_jax.convert"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, check=True)
    assert "import" in r.stdout and "export" in r.stdout
    r = subprocess.run(
        cmd + ["import", BIN_MINI, str(ours), "--scan_layers"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[4/4] pytorch_model-00004-of-00004.bin" in r.stdout
    r = subprocess.run(
        cmd + ["export", str(ours), str(hf), "--max_shard_size", "300KB", "--no_tokenizer"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model-00001-of-" in r.stdout
    cfg, a = import_hf(BIN_MINI)
    _, b = import_hf(str(hf))
    same_hf(dict(hf_tensors(a, cfg)), dict(hf_tensors(b, cfg)))


def test_load_params_onto_abstract_model_and_assign(tmp_path, mini):
    """Our format restores straight into a model built with nnx.eval_shape (both layouts)."""
    from flax import nnx

    from qwenvl_jax.convert import assign_params
    from qwenvl_jax.model.options import ModelOptions
    from qwenvl_jax.model.qwenvl import QWenLMHeadModel

    cfg, _ = mini
    _, params = import_hf(BIN_MINI, scan_layers=True)
    save_params(str(tmp_path / "ours"), params, cfg)
    ref = dict(hf_tensors(params, cfg))
    for scan in (True, False):
        model = nnx.eval_shape(
            lambda scan=scan: QWenLMHeadModel(
                cfg,
                ModelOptions(scan_layers=scan, param_dtype=jax.numpy.bfloat16),
                rngs=nnx.Rngs(0),
            )
        )
        if scan:  # the saved layout: restored by Orbax onto the abstract target
            _, restored = load_params(
                str(tmp_path / "ours"), abstract=nnx.to_pure_dict(nnx.state(model, nnx.Param))
            )
        else:
            _, restored = load_params(str(tmp_path / "ours"), scan_layers=False)
        assign_params(model, restored)
        same_hf(ref, dict(hf_tensors(model, cfg)))
    bad = import_hf(BIN_MINI, scan_layers=False)[1]
    del bad["transformer"]["ln_f"]
    with pytest.raises(
        TreeMismatchError,
        match=r"^bad\.ckpt: does not fit the model: 1 missing \(first transformer\.ln_f\.scale\)$",
    ):
        assign_params(model, bad, source="bad.ckpt")


def test_adapter_without_kv_proj_exports_and_imports(tmp_path):
    """With the ViT width equal to output_dim the adapter has no kv_proj (the reference's
    nn.Identity): the checkpoint holds no such weight and still round-trips bit for bit."""
    from flax import nnx

    from qwenvl_jax.model.factory import build_model
    from qwenvl_jax.model.options import ModelOptions

    cfg = config_lib.get_preset(
        "tiny", hidden_size=64, kv_channels=16, intermediate_size=128,
        visual={"width": 64, "heads": 4, "output_dim": 64, "resampler_heads": 2},
    )  # fmt: skip
    params = nnx.state(build_model(cfg, None, ModelOptions.inference(), seed=0))
    out = tmp_path / "hf"
    export_hf(params, cfg, str(out), tokenizer=None)
    with open(out / "model.safetensors.index.json") as f:
        keys = set(json.load(f)["weight_map"])
    assert "transformer.visual.attn_pool.query" in keys
    assert not any("kv_proj" in k for k in keys)
    cfg2, params2 = import_hf(str(out))
    assert cfg2 == cfg
    same_hf(dict(hf_tensors(params, cfg)), dict(hf_tensors(params2, cfg)))
