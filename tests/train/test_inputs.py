"""What the trainer trains on: no data stops a full-size run at start, `--config.data.train=`
files and `--config.data.mixture=` files reach the pipeline, random tokens only where asked, and
held-out loss from `--config.eval.data=`."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from paths import ROOT
from PIL import Image

from qwenvl_jax import train
from qwenvl_jax.data import pipeline
from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.train import inputs, stage_config

absl_logging.set_verbosity(absl_logging.WARNING)


def _cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "qwenvl_jax.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_full_stage_without_data_stops_before_the_model(tmp_path):
    wd = tmp_path / "w"
    p = _cli("--config=configs/multitask.py", f"--workdir={wd}")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: no training data given: pass --config.data.train=")
    assert "--config.data.mixture=" in lines[0] and "configs/multitask.py:data=random" in lines[0]
    assert not wd.exists()  # stopped before the workdir, the model and the checkpoints
    # Sources cannot be given key by key; the error names the flags that give them.
    p = _cli("--config=configs/sft.py", f"--workdir={wd}", "--config.data.spec.sources.a.path=x")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "use --config.data.train=" in p.stderr


def test_dry_run_needs_no_data(capsys):
    out = train.dry_run(stage_config.load("sft"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "data: none given (a real run needs --config.data.train=a.json[,b.jsonl] or"
        " --config.data.mixture=mixture.json)"
    )
    assert out["mesh"]["model"] == 1  # "auto", laid out as 1 by a dry run that compiles nothing


def test_random_tokens_only_where_asked(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    for stage in ("pretrain", "multitask", "sft"):
        assert inputs.train_spec(stage_config.load(stage)) == ("pipeline", None)
        c = stage_config.load(f"{stage}:data=random")
        assert inputs.train_spec(c) == ("random", None)
        assert inputs.describe(c).startswith("data: RANDOM TOKENS (")
        c = stage_config.load(f"{stage}:tiny")  # the tests' variant: random unless data given
        assert inputs.describe(c).startswith("data: RANDOM TOKENS (")
        c.data.train = str(tmp_path / "a.json")
        kind, spec = inputs.train_spec(c)
        assert kind == "pipeline" and spec.sources.a.task == "chatml" and spec.weight_by_records
    c = stage_config.load("sft:data=random")
    c.data.train = str(tmp_path / "a.json")
    with pytest.raises(ConfigError, match="data.kind='random'.*both given"):
        inputs.train_spec(c)
    with pytest.raises(ConfigError, match=r"data='tokens'; valid: data=random"):
        stage_config.load("sft:data=tokens")
    c = stage_config.load("sft")
    c.data.train, c.data.mixture = str(tmp_path / "a.json"), str(tmp_path / "m.json")
    with pytest.raises(ConfigError, match="data given twice"):
        inputs.train_spec(c)


# ------------------------------------------------------------------------------ mixture files
def _mixture(tmp_path, **entry):
    (tmp_path / "d.jsonl").write_text("")
    src = {"kind": "json", "path": "d.jsonl", "task": "caption", "weight": 2}
    src.update(entry)
    m = {"comment": "x", "mixing": "sequence", "sources": {"caps": src}}
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(m))
    return str(path)


@pytest.mark.parametrize(
    "entry, error",
    [
        ({"wieght": 1}, r"sources.caps: unknown key\(s\) \['wieght'\]; valid: \[.*'weight'"),
        ({"task": "captioning"}, r"sources.caps: task 'captioning'; valid: caption, vqa"),
        ({"path": ""}, r"sources.caps: kind json needs a path"),
        ({"weight": -1}, r"sources.caps: weight -1; it must be a number > 0"),
        ({"weight": "2"}, r"sources.caps: weight '2'"),
        ({"box_format": "xywh"}, r"sources.caps: box_format 'xywh'; valid: xyxy_pixel"),
        (
            {"kind": "tfds", "path": "", "name": "coco_captions", "split": ""},
            r"sources.caps: TFDS 'coco_captions' needs a split",
        ),
        ({"kind": "tfds", "path": ""}, r"sources.caps: kind tfds needs a name"),
        ({"kind": "hf"}, r"sources.caps: kind 'hf'; valid: json, tfds"),
        ({"fields": {"caption": 3}}, r"sources.caps: fields must map"),
        ({"options": {"prompt": "x"}}, r"sources.caps: options \['prompt'\] unknown"),
    ],
)
def test_mixture_entry_errors_name_file_and_entry(tmp_path, entry, error):
    path = _mixture(tmp_path, **entry)
    with pytest.raises(ConfigError, match=r"--config.data.mixture=.*mix.json: " + error):
        inputs.load_mixture(path)


def test_mixture_file_errors(tmp_path):
    with pytest.raises(MissingPathError, match="mixture file .*nope.json' does not exist"):
        inputs.load_mixture(str(tmp_path / "nope.json"))
    path = _mixture(tmp_path, path="missing.jsonl")
    with pytest.raises(MissingPathError, match=r"sources.caps: path '.*missing.jsonl' does not"):
        inputs.load_mixture(path)
    for text, error in [
        ("{", "not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('{"sources": {}}', "'sources' must be a non-empty object"),
        ('{"sources": {"a": {}}, "mixng": "x"}', r"unknown key\(s\) \['mixng'\]"),
        ('{"sources": {"a": {"path": "m.json"}}, "mixing": "task"}', "mixing 'task'; valid"),
        ('{"sources": {"a": {"path": "m.json"}}, "strict": "yes"}', "strict 'yes' has the wrong"),
        ('{"sources": {"a": 3}}', "sources.a is int; it must be an object"),
    ]:
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(ConfigError, match=error):
            inputs.load_mixture(str(tmp_path / "m.json"))


def test_shipped_mixture_is_table3(tmp_path):
    src = os.path.join(ROOT, "configs", "data", "multitask_mixture.json")
    shutil.copy(src, tmp_path / "m.json")
    with pytest.raises(MissingPathError, match=r"sources.vqa: path .*vqa_train.jsonl"):
        inputs.load_mixture(str(tmp_path / "m.json"))  # relative to the file: not there yet
    for name in ("vqa", "grit", "refexp", "ocr", "text"):
        (tmp_path / f"{name}_train.jsonl").write_text("")
    c = inputs.load_mixture(str(tmp_path / "m.json"))
    assert c.mixing == "sequence"
    assert {n: s.weight for n, s in c.sources.items()} == pipeline.TABLE3_SAMPLES_M
    assert c.sources.caption.kind == "tfds" and c.sources.caption.name == "coco_captions"
    assert c.sources.vqa.path == str(tmp_path / "vqa_train.jsonl")


# ---------------------------------------------------------------------- files, end to end
def test_shipped_finetune_example_packs_without_skips():
    from qwenvl_jax.tokenizer import load_tokenizer

    c = stage_config.load("sft:tiny")
    c.data.train = os.path.join(ROOT, "configs", "data", "finetune_example.json")
    _, spec = inputs.train_spec(c)
    spec.num_epochs, spec.shuffle = 1, False
    tok = load_tokenizer(None, image_span=16)  # the tiny model's 16 adapter queries
    with pipeline.make_train_iterator(
        spec, tok, seq_len=128, batch_size_per_host=1, image_size=56, max_images=2
    ) as it:
        batches = list(it)
        assert it.counts() == {
            "finetune_example": {"samples": 4, "tokens": it.counts()["finetune_example"]["tokens"]}
        }
    assert sum(int(b["image_valid"].sum()) for b in batches) == 4  # 1 + 1 + 2 pictures


def _official_json(path, n, colours):
    os.makedirs(path.parent / "im", exist_ok=True)
    recs = []
    for i in range(n):
        name, rgb = colours[i % len(colours)]
        Image.new("RGB", (40, 40), rgb).save(path.parent / "im" / f"{name}.png")
        turns = [{"from": "human", "value": f"Picture 1: <img>im/{name}.png</img>\nColour?"},
                 {"from": "gpt", "value": name}]  # fmt: skip
        recs.append({"id": f"{path.stem}{i}", "conversations": turns})
    path.write_text(json.dumps(recs))
    return str(path)


def test_train_files_end_to_end_with_held_out_loss(tmp_path, capsys):
    colours = [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))]
    a = _official_json(tmp_path / "d" / "a.json", 9, colours)
    b = _official_json(tmp_path / "d" / "b.json", 3, colours[:1])
    val = _official_json(tmp_path / "d" / "val.json", 3, colours)
    c = stage_config.load("sft:tiny")
    c.data.train = f"{a},{b}"
    c.eval.data = val
    c.eval.every_steps, c.eval.batches = 2, 2
    c.batch_size, c.grad_accum, c.steps, c.data.seq_len = 4, 1, 4, 64
    # The held-out batches are the same each time (file order, from the start).
    mcfg = train.model_config(c)
    firsts = []
    for _ in range(2):
        it = train.make_eval_iterator(c, mcfg, 4)
        firsts.append([next(it) for _ in range(2)])
        it.close()
    for x, y in zip(*firsts, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    wd = str(tmp_path / "w")
    hist = train.train(c, wd, devices=jax.devices()[:1])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"data: a (chatml, {a}, weight 1), b (chatml, {b}, weight 1)")
    assert "eval every 2 steps on 2 batches of" in first
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    evals = [r for r in hist if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # A step followed by an evaluation is timed like one that is not: the evaluation waits for
    # the dispatched step, and that wait is training time (it was once counted as evaluation,
    # reporting steps 30x too fast).
    assert evals[-1]["step_s"] > 0.3 * hist[2]["step_s"], [r["step_s"] for r in hist]
    for r in evals:
        assert np.isfinite(r["eval/loss"]) and 0 <= r["eval/accuracy"] <= 1
        assert r["eval/tokens"] > 0
    assert hist[-1]["data/samples"] > 0 and hist[-1]["data/skipped"] == 0
    logged = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["eval/loss"] for r in logged if "eval/loss" in r] == [r["eval/loss"] for r in evals]
    assert os.listdir(os.path.join(wd, "tensorboard"))
