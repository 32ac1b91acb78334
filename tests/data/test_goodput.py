"""Goodput: the real (non-padding) work of packed batches, counted in the trainer's logs as in the
batch arrays; rows of the shipped multi-task mixture >= 90 % real tokens at its packing settings;
per-task packing still one task per row; `data.bench --config` prints the fractions per task."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from paths import ROOT
from PIL import Image

from qwenvl_jax.data import batch as batch_lib
from qwenvl_jax.data import bench, pipeline
from qwenvl_jax.train import stage_config

S = 28  # image side: 2 x 14-pixel patches, cheap to decode


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    """The shipped multi-task recipe's seven tasks as synthetic JSON lines (`data.bench`'s records,
    lengths of the public data sets), 24 records each, over 4 small pictures."""
    d = tmp_path_factory.mktemp("goodput")
    os.makedirs(d / "imgs")
    paths = []
    for i in range(4):
        Image.new("RGB", (S, S), (60 * i, 30, 200 - 40 * i)).save(d / "imgs" / f"{i}.png")
        paths.append(f"imgs/{i}.png")
    srcs, rest = bench.stage_recipe("multitask")
    files = {
        name: (bench.write_task_file(str(d), name, task, paths, 24, S), task, weight)
        for name, (task, weight) in srcs.items()
    }
    return files, rest


def _spec(files, names=None, **kw):
    c = pipeline.default_data_config()
    for name, (path, task, weight) in files.items():
        if names is None or name in names:
            c.sources[name] = pipeline.source_config(path=path, task=task, weight=weight)
    c.prefetch = 1
    for k, v in kw.items():
        c[k] = v
    return c


def _rows(spec, tok, n_batches, *, seq_len, max_images, rows=4):
    it = pipeline.make_train_iterator(
        spec, tok, seq_len=seq_len, batch_size_per_host=rows, image_size=S,
        max_images=max_images, seed=0,
    )  # fmt: skip
    with it:
        return [next(it) for _ in range(n_batches)], it.metrics()


def _segments(seg_row):
    """[(segment id, length)] of one row's samples, from its segment ids alone."""
    return [(k, len(list(g))) for k, g in itertools.groupby(seg_row.tolist()) if k]


def test_real_work_counts_what_the_rows_hold(mixture_dir, tok):
    files, _ = mixture_dir
    batches, metrics = _rows(
        _spec(files, names=("caption", "text")), tok, 3, seq_len=2048, max_images=7
    )
    for b in batches:
        w = batch_lib.real_work(b)
        segs = [_segments(row) for row in b["segment_ids"]]
        assert w["tokens"] == sum(n for row in segs for _, n in row) > 0
        assert w["attended"] == sum(n * n for row in segs for _, n in row)
        assert w["positions"] == b["segment_ids"].size
        # Every valid slot is one <img> span in the tokens (and the other way round).
        assert w["images"] == int((b["input_ids"] == tok.img_start_id).sum()) > 0
    # The packer counts the samples' lengths as it packs them: the same total.
    assert sum(batch_lib.real_work(b)["tokens"] for b in batches) == metrics["data/tokens"]


def test_shipped_multitask_rows_are_at_least_90_percent_real(mixture_dir, tok):
    """Each task packed alone (as per-task mixing packs it) at configs/multitask.py's sequence
    length and image slots: >= 90 % of every row's tokens are real; 4 slots (the old setting)
    leave caption rows near half padding."""
    files, rest = mixture_dir
    cfg = stage_config.load("multitask")
    assert rest["mixing"] == "sequence"  # the shipped mixture packs per task
    t, m = int(cfg.data.seq_len), int(cfg.data.max_images)
    assert (t, m) == (2048, 2048 // 258)
    for name in files:
        batches, _ = _rows(_spec(files, names=(name,)), tok, 4, seq_len=t, max_images=m)
        seg = np.concatenate([b["segment_ids"] for b in batches])
        real = np.count_nonzero(seg) / seg.size
        assert real >= 0.90, (name, real)
    batches, _ = _rows(_spec(files, names=("caption",)), tok, 4, seq_len=t, max_images=4)
    seg = np.concatenate([b["segment_ids"] for b in batches])
    assert np.count_nonzero(seg) / seg.size < 0.6


def _tasks_of_row(row, seg_row, tok):
    """The tasks of one row's samples, read from their decoded prompts."""
    marks = {
        "caption": "Generate the caption in English:",
        "vqa": " Answer:",
        "text": None,
    }
    out = set()
    for k, _ in _segments(seg_row):
        text = tok.decode([int(i) for i in row[seg_row == k] if i < tok.img_start_id])
        hit = [t for t, mark in marks.items() if mark and mark in text]
        out.add(hit[0] if hit else "text")
    return out


def test_per_task_packing_keeps_one_task_per_row(mixture_dir, tok):
    files, _ = mixture_dir
    names = ("caption", "vqa", "text")
    per_row = {}
    for mixing in ("sequence", "sample"):
        batches, metrics = _rows(
            _spec(files, names=names, mixing=mixing), tok, 6, seq_len=2048, max_images=7
        )
        per_row[mixing] = [
            _tasks_of_row(r, s, tok)
            for b in batches
            for r, s in zip(b["input_ids"], b["segment_ids"], strict=True)
        ]
        # The per-source row figures the logs carry, against the batch arrays.
        seg = np.concatenate([b["segment_ids"] for b in batches])
        assert metrics["data/packing_efficiency"] == pytest.approx(np.count_nonzero(seg) / seg.size)
    assert all(len(t) == 1 for t in per_row["sequence"])
    assert {next(iter(t)) for t in per_row["sequence"]} == set(names)
    assert any(len(t) > 1 for t in per_row["sample"])  # the flag: samples of tasks share rows


def test_per_source_rows_and_one_sample_per_row(mixture_dir, tok):
    files, _ = mixture_dir
    spec = _spec(files, names=("caption",), pack=False)
    it = pipeline.make_train_iterator(
        spec, tok, seq_len=2048, batch_size_per_host=4, image_size=S, max_images=7, seed=0
    )
    with it:
        batches = [next(it) for _ in range(2)]
        rows = it.source_rows()["caption"]
    seg = np.concatenate([b["segment_ids"] for b in batches])
    assert set(np.unique(seg).tolist()) == {0, 1}  # one sample per row
    assert rows["rows"] == 8
    assert rows["real_fraction"] == pytest.approx(np.count_nonzero(seg) / seg.size)
    assert rows["images_per_row"] == 1.0


def test_data_bench_config_prints_fractions_per_task(tmp_path):
    cmd = [
        sys.executable, "-m", "qwenvl_jax.data.bench", "--config=configs/multitask.py:tiny",
        "--batches=3", "--batch_rows=2", "--num_images=2", "--num_records=20",
        f"--workdir={tmp_path}",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = stage_config.load("multitask:tiny")
    head = f"{int(cfg.data.seq_len)}-token rows, {int(cfg.data.max_images)} image slots"
    assert head in out.stdout and "mixing=sequence" in out.stdout
    with open(os.path.join(stage_config.CONFIGS_DIR, "data", "multitask_mixture.json")) as f:
        tasks = json.load(f)["sources"]
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.stdout.splitlines() if ln.strip()}
    seen = [t for t in tasks if t in lines]
    assert seen, out.stdout
    for t in seen:
        rows, real, per_row = (float(v) for v in lines[t])
        assert rows >= 1 and 0 < real <= 1 and 0 <= per_row <= int(cfg.data.max_images)
    rows, real, _ = (float(v) for v in lines["all"][1:])
    assert rows == 6 and 0 < real <= 1


@pytest.mark.slow  # one compile of the tiny train step (~20 s on an idle 2-core host)
def test_trainer_logs_the_real_work_of_its_batches(mixture_dir, tmp_path):
    """Two logged steps of a one-layer tiny model on packed pipeline rows: real tokens/s x step_s
    is the number of non-padding tokens of that step's batch, real images the <img> spans in it,
    and the real-work FLOPs those of its samples (attention within each)."""
    import jax

    from qwenvl_jax import flops, train
    from qwenvl_jax.chat import SYSTEM
    from qwenvl_jax.demo.vocab import train_sentencepiece
    from qwenvl_jax.train import inputs

    files, _ = mixture_dir
    # A small SentencePiece vocabulary keeps the embedding and LM head (and the step) small.
    texts = [SYSTEM, "Generate the caption in English: Answer:"] + bench.WORDS
    sp = train_sentencepiece(texts * 5, str(tmp_path / "tokenizer"), vocab_size=300)
    c = stage_config.load("multitask:tiny")
    c.data.tokenizer = str(tmp_path / "tokenizer.model")
    c.model.overrides.vocab_size = sp.vocab_size
    c.model.overrides.visual = {"n_queries": 16, "image_start_id": sp.img_start_id}
    c.model.overrides.num_hidden_layers = 1
    c.steps, c.log_every, c.batch_size, c.grad_accum, c.chip = 3, 1, 4, 1, "v5p"
    c.optim.warmup_steps = 1
    c.data.kind = "pipeline"
    c.data.image_size = S
    c.data.max_images = c.data.seq_len // 18
    c.data.spec = _spec(files, names=("caption", "vqa"))
    c.data.spec.shuffle = False
    # Two steps, stopped before the last step's checkpoint (nothing written: faster).
    history = train.train(c, str(tmp_path / "run"), devices=jax.devices()[:1], stop_after=2)
    s = train.build(c, jax.devices()[:1])
    it = inputs.make_data_iterator(c, s.mcfg, 4)
    with it:
        batches = [next(it) for _ in range(2)]
    for rec, b in zip(history, batches, strict=True):
        segs = [n for row in b["segment_ids"] for _, n in _segments(row)]
        images = int((b["input_ids"] == sp.img_start_id).sum())
        assert 0 < sum(segs) < b["segment_ids"].size and images > 0
        assert rec["real_tokens_per_s"] * rec["step_s"] == pytest.approx(sum(segs))
        assert rec["real_token_fraction"] == pytest.approx(sum(segs) / b["segment_ids"].size)
        assert rec["real_images_per_s"] * rec["step_s"] == pytest.approx(images)
        work = flops.work_flops(
            s.mcfg, tokens=sum(segs), attended=sum(n * n for n in segs), images=images,
            image_size=S,
        )  # fmt: skip
        assert rec["model_tflops_per_s_real"] * rec["step_s"] * 1e12 == pytest.approx(work)
        assert rec["mfu_real"] < rec["mfu"]  # padding and empty slots are not real work
