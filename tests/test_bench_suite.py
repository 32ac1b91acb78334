"""`python -m qwenvl_jax.bench --suite=device`: the one call a lent GPU runs (bench_suite.py).

The device run itself needs a GPU; here the same suite runs end to end at CPU sizes (`--tiny`),
and its plan and table are checked against hand-written results."""

import json
import os
import re
import subprocess
import sys

import pytest
from paths import ROOT

from qwenvl_jax import bench_suite


def _flag(item, name):
    return next((f.split("=", 1)[1] for f in item.flags if f.startswith(f"--{name}=")), None)


def test_device_plan_runs_each_measurement_once_most_important_first():
    items = bench_suite.plan(tiny=False, reference_dir="/ref", reference_python="/py")
    assert [i.name for i in items] == ["ref8", "decode", "full", "attn", "remat", "serve"]
    by = {i.name: i for i in items}
    assert (_flag(by["ref8"], "shape"), _flag(by["full"], "shape")) == ("ref8", "full")
    assert _flag(by["full"], "batch") == "2"
    # The published step beside ref8 and full only.
    assert [i.name for i in items if _flag(i, "reference_dir") == "/ref"] == ["ref8", "full"]
    assert _flag(by["ref8"], "reference_python") == "/py"
    # The 7B decode at batch 1 and 32 (random bf16 weights are the bench's decode default).
    assert (_flag(by["decode"], "shape"), _flag(by["decode"], "decode_batches")) == ("full", "1,32")
    # The A/B items run only what ref8 did not: its kernel and policy are their baseline.
    base_attn, base_remat = _flag(by["ref8"], "attn_impl"), _flag(by["ref8"], "remat")
    assert base_attn not in _flag(by["attn"], "attn_impl").split(",")
    assert base_remat not in _flag(by["remat"], "remat").split(",")
    assert _flag(by["attn"], "remat") == base_remat and _flag(by["remat"], "attn_impl") == base_attn
    # Every item fits the 10-minute call; the serving item runs exactly when its bench exists.
    assert sum(i.cap_s for i in items[:3]) <= 540
    assert (by["serve"].skip == "") == bench_suite.serve_bench_present()
    if by["serve"].skip:
        assert "qwenvl_jax/serve/bench.py" in by["serve"].skip


def _train(shape, attn, remat, tokens_per_s, batch=4, **kw):
    return dict(shape=shape, mode="grad", batch=batch, attn_impl=attn, remat=remat, step_s=0.5,
                tokens_per_s=tokens_per_s, mfu=kw.get("mfu"), peak_memory_gb=None)  # fmt: skip


def test_table_compares_ab_rows_with_item_one_and_the_published_step():
    ref = dict(shape="ref8", batch=4, step_s=0.466, tokens_per_s=17576.0, mfu=0.365,
               peak_memory_gb=57.8, torch="2.11.0", dtype="bfloat16")  # fmt: skip
    summary = dict(
        tiny=False,
        versions={"jax": "0.11.2"},
        items=[
            dict(
                name="ref8",
                result=dict(ours=_train("ref8", "auto", "none", 26364.0, mfu=0.55), reference=ref),
                error="",
            ),  # fmt: skip
            dict(
                name="decode",
                error="",
                result=dict(
                    shape="full",
                    device="H200",
                    prompt_len=256,
                    new_tokens=128,
                    tokens_per_s={"1": 180.0, "32": 4000.0},
                    speedup_vs_stepwise=2.5,
                ),
            ),  # fmt: skip
            dict(name="full", result=None, error="stopped after 210 s"),
            dict(
                name="attn",
                error="",
                result=[
                    _train("ref8", "cudnn", "none", 13182.0),
                    _train("ref8", "xla", "none", 39546.0),
                ],
            ),  # fmt: skip
        ],
    )
    table = bench_suite.markdown(summary)
    lines = [x for x in table.splitlines() if x.startswith("| ")][1:]  # without the header row
    assert len(lines) == 7, table
    published, ours, dec1, dec32, full, cudnn, xla = lines
    assert "published PyTorch" in published and "17,576" in published and "36.5%" in published
    assert "26,364" in ours and "55.0%" in ours and "1.50x published" in ours  # 26364 / 17576
    assert "B=1" in dec1 and "180.0" in dec1 and "2.50x the per-token Python loop" in dec1
    assert "B=32" in dec32 and "4,000.0" in dec32
    assert full.startswith("| full |") and "stopped after 210 s" in full
    assert "0.50x attn auto, remat none" in cudnn  # 13182 / 26364
    assert "1.50x attn auto, remat none" in xla  # 39546 / 26364


@pytest.mark.slow  # each item is a subprocess that imports JAX and compiles: ~3 min, 2 busy cores
def test_tiny_suite_runs_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "qwenvl_jax.bench", "--suite=device", "--tiny",
         f"--suite_out={out}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["device_suite.json", "device_suite.md"]
    summary = json.loads((out / "device_suite.json").read_text())
    recs = {r["name"]: r for r in summary["items"]}
    for name in ("ref8", "decode", "full", "attn", "remat"):
        assert recs[name]["rc"] == 0 and recs[name]["result"], (name, proc.stdout[-3000:])
    assert recs["serve"]["rc"] == 0 or recs["serve"]["error"]
    base, attn = recs["ref8"]["result"], recs["attn"]["result"]
    assert base["attn_impl"] == "auto" and attn["attn_impl"] == "tokamax"
    assert set(recs["decode"]["result"]["tokens_per_s"]) == {"1", "4"}
    table = (out / "device_suite.md").read_text()
    assert table in proc.stdout
    ratio = re.search(r"\| attn \|.*\| ([\d.]+)x attn auto, remat none", table)
    assert ratio, table
    assert float(ratio[1]) == pytest.approx(attn["tokens_per_s"] / base["tokens_per_s"], abs=0.01)
    # Later items reused the compiled programs of earlier ones (one compilation cache).
    assert recs["full"]["result"]["compile_s"] < base["compile_s"]
