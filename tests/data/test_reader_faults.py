"""Readers that never hang or lose good records (issue 24 item 4).

Only regular files are opened: a FIFO or a device as a data file is one line naming it (exit 2 from
the trainer), as an image path a counted skip; a byte-order mark does not cost a record; a source
whose every record is skipped, or more than `data.max_skip_fraction` of its first records, stops
the run with the counts by reason; image paths longer than the model's image span are named once at
start, with the fix.

A reader that wrongly opened a FIFO would block until a writer came: `_unblock` opens the FIFO's
write end after `HANG_S` seconds, so such a reader returns (and the test fails on its timing and
message) instead of hanging the suite.
"""

import codecs
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from paths import ROOT
from PIL import Image

from qwenvl_jax import train
from qwenvl_jax.data import pipeline, sources
from qwenvl_jax.errors import ConfigError, MissingPathError, UserError
from qwenvl_jax.tokenizer import load_tokenizer
from qwenvl_jax.train import inputs, stage_config

HANG_S = 10  # the bound: no reader may wait longer on a FIFO
SPAN = 16  # the tiny model's adapter queries: image paths of at most 15 bytes
LIMIT = dict(max_skip_fraction=0.1, skip_check_records=1000)  # stage_config.base()'s values


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, image_span=SPAN)


def _conv(question, answer="yes"):
    return {
        "conversations": [
            {"from": "user", "value": question},
            {"from": "assistant", "value": answer},
        ]
    }


def _pic(path, i=0):
    return _conv(f"Picture 1: <img>{path}</img>\nWhat is shown {i}?")


def _fifo(path):
    os.mkfifo(path)
    return str(path)


class _unblock:
    """Opens the write end of a FIFO after HANG_S seconds (only a reader that opened it waits)."""

    def __init__(self, fifo):
        self.fifo, self.stop = fifo, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        if not self.stop.wait(HANG_S):
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    def __enter__(self):
        self.t0 = time.monotonic()
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.elapsed = time.monotonic() - self.t0


def _source(path, task="chatml", **kw):
    c = pipeline.default_data_config()
    c.sources.s = pipeline.source_config(path=str(path), task=task, **kw)
    c.num_epochs, c.shuffle = 1, False
    return c


def _run(cfg, tok, **limit):
    """Every batch of one epoch and the counts: {reason: n} of source `s`."""
    args = dict(seq_len=128, batch_size_per_host=1, image_size=28, max_images=2)
    with pipeline.make_train_iterator(cfg, tok, **args, **limit) as it:
        batches = list(it)
        return batches, dict(it.counts()["s"])


def _png(path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)


# ------------------------------------------------------------------- data files: regular only
def test_fifo_and_device_data_files_are_one_line(tmp_path, tok):
    fifo = _fifo(tmp_path / "data.jsonl")
    with _unblock(fifo) as w, pytest.raises(MissingPathError) as e:
        pipeline.make_train_iterator(
            _source(fifo), tok, seq_len=128, batch_size_per_host=1, image_size=28, max_images=1
        )
    assert w.elapsed < HANG_S
    assert str(e.value) == f"data file {fifo} is a FIFO, not a regular file"
    with pytest.raises(MissingPathError, match=r"^data file /dev/zero is a character device, not"):
        sources.JsonRecords("/dev/zero")
    with pytest.raises(MissingPathError, match=r"^data file .* is a directory, not a regular file"):
        sources.JsonRecords(str(tmp_path))
    # Named by the flag that gave it, before the model is built.
    c = stage_config.load("sft:tiny")
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        c.data.train = path
        with pytest.raises(MissingPathError) as e:
            inputs.describe(c)
        assert str(e.value) == f"--config.data.train: {path!r} is {kind}, not a regular file"
    mixture = tmp_path / "mix.json"
    mixture.write_text(json.dumps({"sources": {"a": {"path": "data.jsonl"}}}))
    with pytest.raises(MissingPathError) as e:
        inputs.load_mixture(str(mixture))
    want = (
        f"--config.data.mixture={mixture}: sources.a: path {fifo!r} is a FIFO, not a regular file"
    )
    assert str(e.value) == want


def test_trainer_exits_2_on_a_fifo_data_file(tmp_path):
    fifo = _fifo(tmp_path / "train.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "qwenvl_jax.train", "--config=configs/sft.py:tiny"]
    cmd += [f"--config.data.train={fifo}", f"--workdir={tmp_path / 'w'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        f"error: --config.data.train: {fifo!r} is a FIFO, not a regular file"
    ]


# --------------------------------------------------------- image paths: a counted skip, no hang
def test_fifo_and_device_image_paths_are_counted_skips(tmp_path, tok):
    _png(tmp_path / "ok.png")
    fifo = _fifo(tmp_path / "fifo.png")
    # "." is the data file's own directory.
    recs = [_pic("ok.png", 0), _pic("fifo.png"), _pic("/dev/zero"), _pic("."), _pic("ok.png", 1)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with _unblock(fifo) as w:
        batches, counts = _run(_source(tmp_path / "d.jsonl"), tok)
    assert w.elapsed < HANG_S
    counts.pop("tokens")
    assert counts == {"samples": 2, "image_not_regular_file": 3}
    assert sum(int(b["image_valid"].sum()) for b in batches) == 2
    # Reading an image's header for pixel boxes (no width/height in the record) checks it too.
    recs = [
        {"image": p, "expression": "x", "boxes": [[1, 1, 9, 9]]} for p in ("ok.png", "fifo.png")
    ]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = sources.Source(
        "s", dict(_source(tmp_path / "refs.jsonl", "ref_grounding").sources.s), tok
    )
    with _unblock(fifo) as w:
        skip = src[1]
    assert w.elapsed < HANG_S
    assert isinstance(src[0], sources.tasks.Example)
    assert (skip.reason, skip.message) == (
        "image_not_regular_file",
        f"image {tmp_path / 'fifo.png'} is a FIFO, not a regular file",
    )


# ------------------------------------------------------------------- byte-order marks
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_byte_order_mark_loses_no_record(tmp_path, tok, layout):
    _png(tmp_path / "ok.png")
    recs = [_conv(f"Question {i}?", f"answer {i}") for i in range(5)] + [_pic("ok.png")]
    text = json.dumps(recs) if layout == "json" else "".join(json.dumps(r) + "\n" for r in recs)
    path = tmp_path / f"bom.{layout}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    batches, counts = _run(_source(path), tok, **LIMIT)
    assert counts.pop("samples") == len(recs) and counts.pop("tokens") > 0
    assert counts == {}
    # Every record trained: each answer is in the batches, the first one included.
    text = " ".join(tok.decode(b["input_ids"][b["segment_ids"] > 0].tolist()) for b in batches)
    assert all(f"answer {i}" in text for i in range(5))


def test_byte_order_mark_in_a_mixture_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([_conv("q?")]))
    mixture = tmp_path / "mix.json"
    mixture.write_bytes(
        codecs.BOM_UTF8 + json.dumps({"sources": {"a": {"path": "a.json"}}}).encode()
    )
    c = inputs.load_mixture(str(mixture))
    assert c.sources.a.path == str(tmp_path / "a.json")


# ------------------------------------------------------------------- skipped records
def test_every_record_skipped_stops_at_start_with_the_counts(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    no_answer = {"conversations": [{"from": "user", "value": "hi"}]}
    path.write_text("{not json\n[1, 2]\n" + json.dumps(no_answer) + "\n")
    want = (
        f"data source 'bad' (data file {path}): every record is skipped (3 of 3: bad_record 2,"
        f" malformed_conversation 1); first: record 0: {path} line 1 is not JSON: Expecting"
        " property name enclosed in double quotes: line 1 column 2 (char 1)"
    )
    # The trainer's iterator: the check runs when it is made, before any batch is asked for.
    c = stage_config.load("sft:tiny")
    c.data.train = str(path)
    with pytest.raises(sources.DataError) as e:
        inputs.make_data_iterator(c, train.model_config(c), 1)
    assert isinstance(e.value, UserError)  # the trainer prints one line and exits 2
    assert str(e.value) == want


def test_every_record_skipped_without_a_limit_stops_instead_of_waiting(tmp_path, tok):
    # Bad images are only found as they load; with no rate limit the stream still ends.
    recs = [_pic(f"gone{i}.png", i) for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    cfg = _source(tmp_path / "d.json")
    cfg.num_epochs = None  # repeat forever: the case that waited forever
    out = {}

    def first_batch():
        try:
            with pipeline.make_train_iterator(
                cfg, tok, seq_len=128, batch_size_per_host=1, image_size=28, max_images=1
            ) as it:
                next(it)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    t = threading.Thread(target=first_batch, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), "waited for a batch that never comes"
    assert isinstance(out.get("error"), sources.DataError), out
    path = tmp_path / "gone0.png"
    assert str(out["error"]) == (
        f"data source 's' (data file {tmp_path / 'd.json'}): every record is skipped (3 of 3:"
        f" image_missing 3); first: record 0: image not found: {path}"
    )


def test_skip_rate_over_the_limit_stops_with_the_counts(tmp_path, tok):
    # Records: 8 good, 2 bad (20% > 10%): stopped at start, before any image is read.
    _png(tmp_path / "ok.png")
    good = [_conv(f"q{i}?") for i in range(8)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:3] + ["oops"] + good[3:] + [3]))
    with pytest.raises(sources.DataError) as e:
        _run(_source(path), tok, **LIMIT)
    assert str(e.value) == (
        f"data source 's' (data file {path}): 2 of 10 records skipped (bad_record 2), more than"
        " --config.data.max_skip_fraction=0.1 of the first 1000 (--config.data.skip_check_records);"
        f" first: record 3: {path} line 4: record is str, not an object"
    )
    # At 1 in 20 (5%) the run goes on and counts it.
    path.write_text("".join(json.dumps(r) + "\n" for r in good * 2 + ["oops"] + good[:3]))
    _, counts = _run(_source(path), tok, **LIMIT)
    assert (counts["samples"], counts["bad_record"]) == (19, 1)
    # Images are judged as they load: 3 of 10 missing stops the first batch (window of 10).
    recs = [_pic("ok.png", i) for i in range(7)] + [_pic(f"gone{i}.png") for i in range(3)]
    path = tmp_path / "img.json"
    path.write_text(json.dumps(recs[:2] + recs[7:] + recs[2:7]))
    with pytest.raises(sources.DataError) as e:
        _run(_source(path), tok, max_skip_fraction=0.1, skip_check_records=10)
    assert str(e.value) == (
        f"data source 's' (data file {path}): 2 of 4 records skipped (image_missing 2), more than"
        " --config.data.max_skip_fraction=0.1 of the first 10 (--config.data.skip_check_records);"
        f" first: record 2: image not found: {tmp_path / 'gone0.png'}"
    )


def test_limit_values_are_checked(tmp_path, tok):
    (tmp_path / "a.json").write_text(json.dumps([_conv("q?"), "oops"]))
    with pytest.raises(ConfigError, match=r"max_skip_fraction=1.5 must be in \[0, 1\]"):
        _run(_source(tmp_path / "a.json"), tok, max_skip_fraction=1.5, skip_check_records=10)
    # skip_check_records=0: no limit, the bad record is only counted.
    _, counts = _run(_source(tmp_path / "a.json"), tok, max_skip_fraction=0.1, skip_check_records=0)
    assert (counts["samples"], counts["bad_record"]) == (1, 1)


# ------------------------------------------------------------------- image paths too long
def test_image_paths_longer_than_the_span_are_one_start_up_line(tmp_path, tok, caplog):
    os.makedirs(tmp_path / "pictures/of/shapes")
    long = [f"pictures/of/shapes/{c}.png" for c in ("red", "green", "blue", "cyan")]
    for p in long:
        _png(tmp_path / p)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([_pic(p, i) for i, p in enumerate(long)]))
    c = stage_config.load("sft:tiny")  # 16 queries: 15-byte paths
    c.data.train = str(path)
    with caplog.at_level("WARNING"), pytest.raises(ConfigError) as e:
        inputs.make_data_iterator(c, train.model_config(c), 1)
    assert str(e.value) == (
        f"data file {path}: 4 of 4 records have image paths longer than the model's 15-byte image"
        " span (first: 'pictures/of/shapes/red.png', record 0); the path as written between <img>"
        f" and </img> must fit: use shorter paths, relative to the image root {tmp_path} (the data"
        " file's directory, or image_root in a mixture file), or a model with more queries"
        " (--config.model.overrides.visual.n_queries=256, the published span)"
    )
    assert "skipped" not in caplog.text  # named once, not a warning per record
    # The fix it names works: the published span trains every record with its image.
    c.model.overrides.visual.n_queries = 256
    c.data.seq_len = 320
    it = inputs.make_data_iterator(c, train.model_config(c), 4)
    try:
        b = next(it)
    finally:
        it.close()
    assert int(b["image_valid"].sum()) == 4 and it.counts()["mine"].get("samples") == 4
    assert np.isfinite(b["images"]).all()
