"""`qwenvl_jax.bench --reference_dir=...`: our step and the published PyTorch step side by side.

The side-by-side run needs the published Qwen-VL code and a Python with torch, which are not ours
to ship: set QWENVL_REFERENCE_DIR (a directory with modeling_qwen.py, visual.py, ...) and
QWENVL_REFERENCE_PYTHON (that environment's python, with torch and transformers==4.37.2)."""

import json
import os
import re
import subprocess
import sys

import pytest

from qwenvl_jax import bench
from qwenvl_jax.errors import ConfigError, MissingPathError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = os.environ.get("QWENVL_REFERENCE_DIR", "")
REF_PY = os.environ.get("QWENVL_REFERENCE_PYTHON", "")


def _bench(*flags, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "qwenvl_jax.bench", *flags],
        capture_output=True, text=True, cwd=cwd, env=env,
    )  # fmt: skip


@pytest.mark.slow  # ~2 min beside other jobs on the shared 2-core CPU; both steps compile/allocate
@pytest.mark.skipif(
    not (os.path.isfile(os.path.join(REF_DIR, "modeling_qwen.py")) and os.path.isfile(REF_PY)),
    reason="set QWENVL_REFERENCE_DIR (the published Qwen-VL code) and QWENVL_REFERENCE_PYTHON"
    " (a python with torch, transformers==4.37.2, einops) to run the published step",
)
def test_side_by_side_runs_the_published_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench(
        "--shape=tiny_ref", "--steps=1", "--warmup=0", f"--reference_dir={REF_DIR}",
        f"--reference_python={REF_PY}", f"--json_out={out}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    ours, ref = r["ours"], r["reference"]
    assert ref["impl"].startswith("published PyTorch") and ref["mode"] == "grad"
    assert (ref["batch"], ref["seq_len"]) == (ours["batch"], ours["seq_len"]) == (1, 528)
    # Two implementations built from the same config.json numbers: any size that differs (256
    # adapter queries, the vocabulary, ...) changes these. By hand: embedding and LM head
    # 2 x 151936 x 256 = 77,791,232; two decoder layers of 656,640 (c_attn with bias, c_proj, w1,
    # w2, mlp.c_proj at 512, two norms); ln_f 256; ViT 121,088 (its 16 x 16 x 64 position table
    # is resized at run time) + adapter 411,648 (query, fixed pos_embed, kv_proj, attention, two
    # norms) + ln_post and proj 66,048.
    assert ref["params"] == ours["params"] == 79_703_552
    # The image span was found by the published forward and one picture encoded per row.
    assert ref["images_per_step"] == 1
    assert ref["tokens_per_s"] > 0 and ours["tokens_per_s"] > 0
    assert 0 < ref["loss"] < 20 and 0 < ours["loss"] < 20
    text = proc.stdout
    assert re.search(r"published PyTorch on cpu.* [\d,]+ tokens/s", text), text
    ratio = re.search(r"remat=none every slot: ([\d.]+)x tokens/s \(([\d,]+) vs ([\d,]+)\)", text)
    assert ratio, text
    assert float(ratio[1]) == pytest.approx(ours["tokens_per_s"] / ref["tokens_per_s"], abs=0.01)


def test_reference_dir_must_hold_the_published_code(tmp_path):
    with pytest.raises(MissingPathError, match="--reference_dir=.* is not a directory"):
        bench.check_reference(str(tmp_path / "nope"), sys.executable)
    (tmp_path / "visual.py").write_text("")
    with pytest.raises(MissingPathError, match="has no modeling_qwen.py, configuration_qwen.py"):
        bench.check_reference(str(tmp_path), sys.executable)


def test_reference_python_without_torch_names_what_to_install(tmp_path):
    for f in ("modeling_qwen.py", "visual.py", "configuration_qwen.py", "qwen_generation_utils.py"):
        (tmp_path / f).write_text("")
    with pytest.raises(MissingPathError, match="--reference_python=.*/no-python does not exist"):
        bench.check_reference(str(tmp_path), str(tmp_path / "no-python"))
    # A real interpreter that sees no site-packages: none of the reference's packages import.
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    with pytest.raises(UserError) as e:
        bench.check_reference(str(tmp_path), str(bare))
    msg = str(e.value)
    assert "\n" not in msg and f"--reference_python={bare} cannot import torch, transformers" in msg
    assert "pip install torch transformers==4.37.2" in msg


def test_shape_the_published_code_cannot_build_is_refused():
    # multitask:tiny has 16 adapter queries; the published resampler hard-codes 256.
    c = bench.bench_config("tiny", "grad", "none", "auto")
    with pytest.raises(ConfigError, match=r"--shape=tiny has visual.n_queries=16"):
        bench.reference_inputs(c, "tiny", 1)
    hf, per_row = bench.reference_inputs(
        bench.bench_config("ref8", "grad", "none", "auto"), "ref8", 1
    )
    assert (hf["num_hidden_layers"], hf["visual"]["image_size"], per_row) == (8, 448, [1] * 4)


def test_cli_error_is_one_line(tmp_path):
    proc = _bench("--shape=tiny_ref", f"--reference_dir={tmp_path}/missing", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: --reference_dir={tmp_path}/missing is not a directory")
    )
