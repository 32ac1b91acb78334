"""Untrusted model files end in one line naming the file and what is wrong (issue 24, item 3).

Malformed torch `.bin` records (a negative stride, a negative storage offset, a zero stride that
repeats one element into terabytes, a storage that claims 1 TiB), out-of-range `config.json`
values and a bad `generation_config.json`.

The `.bin` files are written here the way `torch.save` lays them out (a zip of `archive/data.pkl`,
one stored member `archive/data/<key>` per storage, and `archive/version`), with the pickle opcodes
spelled out, so no torch is needed. A malformed file is loaded by the `convert` command line in a
child process under a 2 GiB address-space limit and a timeout, so a crash or a huge allocation fails
the test rather than the machine.
"""

import json
import os
import pickle
import subprocess
import sys
import threading
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest

from qwenvl_jax import QwenVL
from qwenvl_jax import config as config_lib
from qwenvl_jax.api import read_generation_config
from qwenvl_jax.convert import TensorFileError, hf, openclip, qwen_llm, tensor_io
from qwenvl_jax.errors import CheckpointError, ConfigError

MEMORY_LIMIT = 2 * 2**30  # the child's address space: jax and a tiny conversion fit easily
KEY = "transformer.wte.weight"


# ----------------------------------------------------------------------------- torch.save layout
def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _value(obj) -> bytes:
    """The opcodes that push one plain value (int, str, tuple of ints), without PROTO and STOP."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def tensor_record(storage: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` with
    the storage as torch's persistent id ('storage', torch.<storage>, key, 'cpu', numel)."""
    pid = b"(" + _value("storage") + _global("torch", storage)
    pid += _value(key) + _value("cpu") + _value(numel) + b"tQ"  # TUPLE, BINPERSID
    args = b"(" + pid + _value(offset) + _value(tuple(size)) + _value(tuple(stride))
    args += b"\x89" + _global("collections", "OrderedDict") + b")Rt"  # False, OrderedDict()
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_bin(path, records: dict[str, bytes], storages: dict[str, bytes]) -> None:
    """A torch zip-format state dict: name -> tensor_record, storage key -> little-endian bytes."""
    pkl = b"\x80\x02}(" + b"".join(_value(k) + r for k, r in records.items()) + b"u."
    with zipfile.ZipFile(path, "w") as z:  # ZIP_STORED, as torch.save writes
        z.writestr("archive/data.pkl", pkl)
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")


F32 = np.arange(24, dtype="<f4")  # storage "0": 24 float32 values 0..23


def test_valid_layouts_torch_save_writes_still_load(tmp_path):
    """Transposed, offset, expanded (zero stride), shared, scalar and empty tensors read as torch
    reads them (values written out by hand from the layouts)."""
    bf16 = np.array([1.5, -2.0], ml_dtypes.bfloat16)
    path = tmp_path / "ok.bin"
    write_bin(
        path,
        {
            "transposed": tensor_record("FloatStorage", "0", 24, 0, (6, 4), (1, 6)),
            "offset": tensor_record("FloatStorage", "0", 24, 5, (3,), (1,)),
            "expanded": tensor_record("FloatStorage", "0", 24, 2, (2, 3), (0, 1)),
            "scalar": tensor_record("BFloat16Storage", "1", 2, 1, (), ()),
            "empty": tensor_record("FloatStorage", "0", 24, 0, (0, 4), (4, 1)),
        },
        {"0": F32.tobytes(), "1": bf16.tobytes()},
    )
    got = dict(tensor_io.iter_torch_bin(str(path)))
    # transposed: element [i, j] is storage[i * 1 + j * 6], i.e. arange(24).reshape(4, 6).T
    assert got["transposed"].tolist() == [[j * 6 + i for j in range(4)] for i in range(6)]
    assert got["offset"].tolist() == [5.0, 6.0, 7.0]
    assert got["expanded"].tolist() == [[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]]
    assert got["scalar"].dtype == ml_dtypes.bfloat16 and float(got["scalar"]) == -2.0
    assert got["empty"].shape == (0, 4)


# Each malformed record -> the line after "<file>: tensor 'transformer.wte.weight'".
MALFORMED = {
    "negative_stride": (
        tensor_record("FloatStorage", "0", 24, 0, (4, 6), (-(2**30), 1)),
        F32,
        " has a negative stride (-1073741824, 1) (torch.save never writes one)",
    ),
    "negative_offset": (
        tensor_record("FloatStorage", "0", 24, -4, (4,), (1,)),
        F32,
        " has a negative storage offset -4",
    ),
    "zero_stride_4TiB": (
        tensor_record("FloatStorage", "0", 24, 0, (2**20, 2**20), (0, 0)),
        F32,
        " (size (1048576, 1048576), stride (0, 0)) has 1099511627776 elements"
        " (4398046511104 bytes (4.0 TiB)), more than the whole file holds ({size} bytes)",
    ),
    "storage_claims_1TiB": (
        tensor_record("FloatStorage", "0", 2**38, 0, (2**38,), (1,)),
        F32,
        ": its storage data/0 claims 274877906944 elements (1099511627776 bytes (1.0 TiB)),"
        " more than the whole file holds ({size} bytes)",
    ),
}
# Malformed records that never crashed or allocated: checked in this process.
INCONSISTENT = {
    "storage_size_disagrees": (
        tensor_record("FloatStorage", "0", 30, 0, (30,), (1,)),
        ": its storage data/0 claims 30 elements (120 bytes) but the archive stores 96 bytes",
    ),
    "reads_past_storage": (
        tensor_record("FloatStorage", "0", 24, 20, (2, 4), (4, 1)),
        " (size (2, 4), stride (4, 1), storage offset 20) reads past its storage of 24 elements",
    ),
    "size_not_ints": (
        tensor_record("FloatStorage", "0", 24, 0, ("4",), (1,)),
        " has size ('4',); expected a tuple of integers",
    ),
    "ranks_differ": (
        tensor_record("FloatStorage", "0", 24, 0, (4, 6), (1,)),
        " has size (4, 6) but stride (1,) (lengths differ)",
    ),
}


# The child limits its own address space first, then runs `python -m qwenvl_jax.convert ARGS` (a
# preexec_fn would run in a fork of this multithreaded JAX process, which may deadlock).
_LIMITED_CONVERT = f"""
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
sys.argv[0] = "qwenvl_jax.convert"
runpy.run_module("qwenvl_jax.convert", run_name="__main__", alter_sys=True)
"""


def run_convert_limited(*args: str) -> subprocess.CompletedProcess:
    """`python -m qwenvl_jax.convert *args` under the memory limit, with a timeout."""
    return subprocess.run(
        [sys.executable, "-c", _LIMITED_CONVERT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bin_is_one_line_exit_2(tmp_path, case):
    """`convert import` of a directory whose .bin holds the malformed record: `error: ...` naming
    the file, the tensor and the fault, exit 2, no signal, within the memory limit; no output."""
    record, storage, what = MALFORMED[case]
    src = tmp_path / "hf"
    src.mkdir()
    config_lib.get_preset("tiny").save_hf_json(str(src))
    weights = src / "pytorch_model.bin"
    write_bin(weights, {KEY: record}, {"0": storage.tobytes()})
    out = tmp_path / "out"
    proc = run_convert_limited("import", str(src), str(out))
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    expected = f"error: import: {weights}: tensor {KEY!r}" + what.format(
        size=weights.stat().st_size
    )
    assert proc.stderr.strip().splitlines() == [expected], proc.stderr[-3000:]
    assert proc.returncode == 2
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("case", sorted(INCONSISTENT) + ["negative_offset"])
def test_malformed_record_is_refused_at_open(tmp_path, case):
    """The library refuses the record when the file is opened (before any storage byte is read),
    with a TensorFileError (a CheckpointError); openclip's shape reader too. A good tensor beside
    it does not change that."""
    record, what = INCONSISTENT[case] if case in INCONSISTENT else MALFORMED[case][::2]
    good = tensor_record("FloatStorage", "0", 24, 0, (24,), (1,))
    path = tmp_path / "open_clip_pytorch_model.bin"
    write_bin(path, {"good": good, "visual.conv1.weight": record}, {"0": F32.tobytes()})
    want = f"{path}: tensor 'visual.conv1.weight'{what}"
    with pytest.raises(TensorFileError) as e:
        tensor_io.read_torch_bin(str(path))
    assert str(e.value) == want and isinstance(e.value, CheckpointError)
    with pytest.raises(TensorFileError) as e:
        openclip.tensor_shapes(str(path))
    assert str(e.value) == want


def test_compressed_or_missing_storage_is_refused(tmp_path):
    record = tensor_record("FloatStorage", "0", 24, 0, (24,), (1,))
    path = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}(" + _value("w") + record + b"u.")
        z.writestr("archive/data/0", F32.tobytes())
    with pytest.raises(TensorFileError) as e:
        tensor_io.read_torch_bin(str(path))
    assert str(e.value) == (
        f"{path}: tensor 'w': its storage data/0 is compressed (torch.save stores storages"
        " uncompressed; re-save the file with torch.save)"
    )
    path = tmp_path / "missing.bin"
    write_bin(path, {"w": record}, {})
    with pytest.raises(TensorFileError) as e:
        tensor_io.read_torch_bin(str(path))
    assert str(e.value) == f"{path}: tensor 'w': its storage data/0 is not in the archive"


# ----------------------------------------------------------------------------- config.json bounds
PUBLISHED = config_lib.get_preset("qwen-vl-7b").to_hf_dict()


def _section(d: dict, field: str) -> tuple[dict, str]:
    return (d["visual"], field[len("visual.") :]) if field.startswith("visual.") else (d, field)


# field -> (bad value, the line after "<file>: "); each one is read within a second.
BAD_FIELDS = {
    "num_hidden_layers": (10**7, "num_hidden_layers=10000000 is not an integer in [0, 1024]"),
    "visual.image_size": (10**6, "visual.image_size=1000000 is not an integer in [1, 4096]"),
    "visual.patch_size": (0, "visual.patch_size=0 is not an integer in [1, 1024]"),
    "visual.layers": (4.5, "visual.layers=4.5 is not an integer in [0, 1024]"),
    "hidden_size": (2**17, "hidden_size=131072 is not an integer in [1, 65536]"),
    "vocab_size": ("151936", "vocab_size='151936' is not an integer in [1, 2097152]"),
    "num_attention_heads": (-1, "num_attention_heads=-1 is not an integer in [1, 1024]"),
    "use_logn_attn": ("yes", "use_logn_attn='yes' is not true or false"),
    "layer_norm_epsilon": (float("nan"), "layer_norm_epsilon=nan is not a number in (0, 1)"),
    "visual": ([], "visual=[] is not a section (a JSON object)"),
}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_config_field_out_of_bounds_is_one_line_within_a_second(tmp_path, field):
    value, what = BAD_FIELDS[field]
    d = json.loads(json.dumps(PUBLISHED))
    section, key = _section(d, field)
    section[key] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        hf.read_config(str(tmp_path))
    assert time.perf_counter() - t0 < 1.0
    assert str(e.value) == f"{tmp_path / 'config.json'}: {what}"


def test_config_cross_field_and_shape_faults(tmp_path):
    """image_size must be a multiple of patch_size; a JSON list is no config; the published
    config.json itself still reads (nothing good is refused)."""
    d = json.loads(json.dumps(PUBLISHED))
    d["visual"]["image_size"] = 450
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        hf.read_config(str(tmp_path))
    path = tmp_path / "config.json"
    assert str(e.value) == f"{path}: visual.image_size=450 is not a multiple of patch_size=14"
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError) as e:
        hf.read_config(str(tmp_path))
    assert str(e.value) == f"{path}: holds a JSON list, not an object of config fields"
    path.write_text(json.dumps(PUBLISHED))
    assert hf.read_config(str(tmp_path)) == config_lib.get_preset("qwen-vl-7b")


def test_presets_and_overrides_are_bounded():
    """The same bounds guard the trainer's overrides (a ConfigError: one line, exit 2)."""
    with pytest.raises(ConfigError) as e:
        config_lib.get_preset("tiny", num_hidden_layers=10**7)
    assert str(e.value) == "num_hidden_layers=10000000 is not an integer in [0, 1024]"
    with pytest.raises(ConfigError) as e:
        config_lib.get_preset("tiny", visual={"output_dim": 64, "resampler_heads": None})
    assert str(e.value) == "visual.resampler_heads=0 is not an integer in [1, 1024]"


def test_text_only_qwen_config_out_of_bounds(tmp_path):
    """import-llm's config.json: a bad LLM field is named as itself (no ZeroDivisionError)."""
    d = {k: PUBLISHED[k] for k in ("vocab_size", "hidden_size", "num_attention_heads")}
    for field, value, what in (
        ("num_hidden_layers", 10**7, "num_hidden_layers=10000000 is not an integer in [0, 1024]"),
        ("num_attention_heads", 0, "num_attention_heads=0 is not an integer in [1, 1024]"),
        ("hidden_size", "4096", "hidden_size='4096' is not an integer in [1, 65536]"),
    ):
        bad = {**d, "num_hidden_layers": 32, field: value}
        with pytest.raises(CheckpointError) as e:
            qwen_llm.llm_config(bad, source="q/config.json")
        assert str(e.value) == f"q/config.json: {what}"
    assert qwen_llm.llm_config({**d, "num_hidden_layers": 32}).num_hidden_layers == 32


def test_openclip_shapes_out_of_bounds():
    """A ViT whose position table says 400x400 patches of 14 px (5600 px images)."""
    shapes = {
        "visual.conv1.weight": (64, 3, 14, 14),
        "visual.positional_embedding": (1 + 400 * 400, 64),
        "visual.class_embedding": (64,),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (256, 64),
    }
    with pytest.raises(CheckpointError) as e:
        openclip.vit_config(shapes, heads=4, source="clip.bin")
    assert str(e.value) == (
        "clip.bin: the ViT read from its shapes is out of bounds: visual.image_size=5600 is not"
        " an integer in [1, 4096]"
    )


def test_config_json_cli_is_one_line_exit_2(tmp_path):
    """`convert import` of a directory whose config.json says 10^7 layers: exit 2 at once."""
    d = json.loads(json.dumps(PUBLISHED))
    d["num_hidden_layers"] = 10**7
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(d))
    proc = run_convert_limited("import", str(src), str(tmp_path / "out"))
    want = (
        f"error: import: {src / 'config.json'}: num_hidden_layers=10000000 is not an integer in"
        " [0, 1024]"
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (2, [want]), proc.stderr[-2000:]


# ----------------------------------------------------------------------------- generation_config
BAD_GENERATION = {
    "not_json": ("{max_new_tokens: 3}", " is not valid JSON: Expecting property name enclosed in"
                 " double quotes: line 1 column 2 (char 1)"),
    "list": ("[1]", " holds a JSON list, not an object"),
    "max_new_tokens": ('{"max_new_tokens": "512"}',
                       ": max_new_tokens='512' is not an integer in [1, 1048576]"),
    "do_sample": ('{"do_sample": "false"}', ": do_sample='false' is not true or false"),
    "top_p": ('{"top_p": 2}', ": top_p=2 is not a number in (0, 1] or null"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_GENERATION))
def test_bad_generation_config_is_one_line(tmp_path, case):
    """QwenVL.from_pretrained names the file and the key before it reads any weight."""
    text, what = BAD_GENERATION[case]
    config_lib.get_preset("tiny").save_hf_json(str(tmp_path))
    gen_file = tmp_path / "generation_config.json"
    gen_file.write_text(text)
    with pytest.raises(CheckpointError) as e:
        QwenVL.from_pretrained(str(tmp_path))
    assert str(e.value) == f"{gen_file}{what}"


def test_published_generation_config_is_kept(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(hf.GENERATION_CONFIG))
    assert read_generation_config(str(tmp_path)) == {
        "do_sample": True,
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "top_k": 0,
        "top_p": 0.3,
    }
    assert read_generation_config(str(tmp_path / "none")) is None


def test_config_json_that_is_a_fifo_huge_or_has_a_bom(tmp_path):
    """A FIFO config.json is refused without opening it (a helper thread opens its other end after
    5 s, so a reader that blocks still ends, and fails the exact message); one over 16 MiB is not
    read; a UTF-8 byte-order mark is accepted."""
    src = tmp_path / "qwen7b"
    src.mkdir()
    cfg_path = src / "config.json"
    os.mkfifo(cfg_path)
    unblock = threading.Timer(5.0, lambda: open(cfg_path, "wb").close())
    unblock.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError) as e:
            qwen_llm.import_qwen_llm(str(src))
        assert time.perf_counter() - t0 < 1.0
        assert str(e.value) == f"{cfg_path} is not a regular file"
    finally:
        unblock.cancel()
    os.remove(cfg_path)
    with open(cfg_path, "wb") as f:
        f.truncate(config_lib.MAX_CONFIG_BYTES + 1)
    with pytest.raises(CheckpointError) as e:
        qwen_llm.import_qwen_llm(str(src))
    assert str(e.value) == (
        f"{cfg_path} is {config_lib.MAX_CONFIG_BYTES + 1} bytes; a config.json is a few KiB"
        f" (at most {config_lib.MAX_CONFIG_BYTES})"
    )
    cfg_path.write_text("\ufeff" + json.dumps(PUBLISHED), encoding="utf-8")
    assert hf.read_config(str(src)) == config_lib.get_preset("qwen-vl-7b")


def test_oversized_pickle_is_not_read(tmp_path, monkeypatch):
    """data.pkl longer than MAX_PICKLE_BYTES (here lowered to 64 bytes) is refused unread."""
    path = tmp_path / "big_pickle.bin"
    record = tensor_record("FloatStorage", "0", 24, 0, (24,), (1,))
    write_bin(path, {"w": record}, {"0": F32.tobytes()})
    size = zipfile.ZipFile(path).getinfo("archive/data.pkl").file_size
    monkeypatch.setattr(tensor_io, "MAX_PICKLE_BYTES", 64)
    with pytest.raises(TensorFileError) as e:
        tensor_io.read_torch_bin(str(path))
    assert str(e.value) == (
        f"{path}: its archive/data.pkl is {size} bytes; a state dict's pickle is far smaller (at"
        " most 64 read)"
    )
    monkeypatch.setattr(tensor_io, "MAX_PICKLE_BYTES", size)
    assert tensor_io.read_torch_bin(str(path))["w"].shape == (24,)
