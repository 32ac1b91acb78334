"""`python -m qwenvl_jax.evaluate` on a tiny random HF checkpoint and the eval fixtures' layout.

The checkpoint is the reference fixture model written as an HF directory (tests/test_api.py);
the data are tests/fixtures/eval/data with small pictures written at the paths the files name.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from held import wait_until
from paths import FIXTURES as TEST_FIXTURES
from paths import ROOT
from PIL import Image

from qwenvl_jax import QwenVL, evaluate
from qwenvl_jax.eval import benchmarks, run
from qwenvl_jax.eval import metrics as metrics_lib

FIXTURES = os.path.join(TEST_FIXTURES, "eval", "data")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    shutil.copytree(FIXTURES, root / "data")
    rng = np.random.default_rng(0)
    for name in ("vqav2_val", "scienceqa_test_img", "refcoco_val"):
        for r in benchmarks.read_records(name, str(root)):
            path = root / r["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(path)
    return str(root)


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_batched_predictions_equal_per_question_generation(hf_dir, data_dir, tmp_path):
    res = run.evaluate(hf_dir, "vqav2_val", data_dir, str(tmp_path), batch_size=3, limit=5,
                       dtype="float32")  # fmt: skip
    lines = [json.loads(x) for x in _lines(tmp_path / "vqav2_val.jsonl")]
    records = list(benchmarks.read_records("vqav2_val", data_dir))[:5]
    assert [d["question_id"] for d in lines] == [r["question_id"] for r in records]
    model = QwenVL.from_pretrained(hf_dir, "float32", image_root=data_dir)
    tok = model.tokenizer
    for d, r in zip(lines, records, strict=True):
        ids = model.generate(r["prompt"], max_new_tokens=10)  # the script's max_new_tokens
        assert d["output"] == tok.decode(ids, skip_special_tokens=True)
    assert res["n"] == 5 and isinstance(res["score"], float)
    scores = json.load(open(tmp_path / "vqav2_val_scores.json"))
    assert scores["score"] == res["score"] and scores["metric"] == "vqa_score"


def test_scienceqa_scored_by_choice_loss(hf_dir, data_dir, tmp_path):
    res = run.evaluate(hf_dir, "scienceqa_test_img", data_dir, str(tmp_path), batch_size=2,
                       dtype="float32")  # fmt: skip
    lines = [json.loads(x) for x in _lines(tmp_path / "scienceqa_test_img.jsonl")]
    records = list(benchmarks.read_records("scienceqa_test_img", data_dir))
    model = QwenVL.from_pretrained(hf_dir, "float32", image_root=data_dir)
    tok = model.tokenizer
    # By hand from the plain logits: mean cross-entropy of each target's tokens.
    for d, r in zip(lines, records, strict=True):
        want = []
        for target in r["targets"]:
            p, t = tok.encode(r["prompt"]), tok.encode(target)
            logits = model.logits(p + t).astype(np.float64)
            m = logits.max(-1, keepdims=True)
            logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
            pos = np.arange(len(p) - 1, len(p) + len(t) - 1)
            want.append(-logp[pos, t].mean())
        np.testing.assert_allclose(d["output"], want, rtol=1e-4)
    expect = metrics_lib.multiple_choice_accuracy(
        [d["output"] for d in lines], [r["answer"] for r in records]
    )
    assert res["score"] == expect


def test_chat_grounding_runs_and_resumes_without_the_model(hf_dir, data_dir, tmp_path, monkeypatch):
    run.evaluate(hf_dir, "refcoco_val", data_dir, str(tmp_path), batch_size=4, limit=4,
                 chat=True, dtype="float32")  # fmt: skip
    before = _lines(tmp_path / "refcoco_val.jsonl")
    assert len(before) == 4

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every question was done")

    monkeypatch.setattr(QwenVL, "from_pretrained", no_model)
    res = run.evaluate(hf_dir, "refcoco_val", data_dir, str(tmp_path), batch_size=4, limit=4,
                       chat=True)  # fmt: skip
    assert _lines(tmp_path / "refcoco_val.jsonl") == before
    assert res["metric"] == "grounding"


def test_a_line_cut_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": 1, "output": "a"}\n{"question_id": 2, "outp')
    assert run.read_predictions(str(path)) == {"1": "a"}
    assert path.read_text() == '{"question_id": 1, "output": "a"}\n'


def test_cli_errors_are_one_line(hf_dir, data_dir, tmp_path, capsys):
    def err(*flags):
        assert evaluate.main(list(flags)) == 2
        out = capsys.readouterr().err.strip()
        assert out.startswith("error: ") and "\n" not in out
        return out

    base = ["--checkpoint", hf_dir, "--data_dir", data_dir, "--out", str(tmp_path)]
    msg = err(*base, "--benchmark", "textvqa")
    assert "textvqa_val" in msg and "scienceqa_test_img" in msg
    assert "no test file" in err(
        *base[:2], "--data_dir", str(tmp_path), "--benchmark", "gqa_testdev"
    )
    bad = [
        "--checkpoint",
        str(tmp_path / "nope"),
        "--data_dir",
        data_dir,
        "--benchmark",
        "vqav2_val",
    ]
    assert "nope does not exist" in err(*bad)


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(hf_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qwenvl_jax.evaluate", "--checkpoint", hf_dir,
           "--benchmark", "vqav2_val", "--data_dir", data_dir, "--out", str(out),
           "--batch_size", "1", "--limit", "12", "--dtype", "float32"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    preds = out / "vqav2_val.jsonl"
    # Held once 2 predictions are written (the tests' barrier), then killed.
    proc = subprocess.Popen([*cmd, "--pause_after", "2"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    held = out / "vqav2_val.paused"
    wait_until(held.exists, [proc], "held after 2 predictions", 600)
    proc.kill()
    proc.wait()
    killed = _lines(preds)
    assert len(killed) == 2 and preds.read_text().endswith("\n")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(killed)} already in" in done.stdout
    after = _lines(preds)
    assert after[: len(killed)] == killed and len(after) == 12
    ids = [json.loads(x)["question_id"] for x in after]
    assert len(set(ids)) == 12
    assert json.load(open(out / "vqav2_val_scores.json"))["n"] == 12
