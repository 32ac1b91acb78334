"""The grain pipeline end to end: the batch contract, JSON / JSON-lines / TFDS sources, mixtures,
exact resume (threads, worker processes, two host shards), and every kind of bad input counted."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import image as qimage
from qwenvl_jax.data import pipeline, sources

S = 28  # image side for these tests (2 x 14-pixel patches)
T = 700
IMG, IMG_END = 151857, 151858


def _jpeg(path, w, h, colour):
    Image.new("RGB", (w, h), colour).save(path, "JPEG")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    os.makedirs(d / "imgs")
    for i in range(8):
        _jpeg(d / "imgs" / f"{i}.jpg", 40 + 3 * i, 30 + i, (30 * i, 200 - 20 * i, 90))
    chat = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "user", "value": f"Picture 1: <img>imgs/{i % 8}.jpg</img>\nSample c{i}?"},
                {"from": "assistant", "value": "yes " * (1 + i % 7)},
            ],
        }
        for i in range(24)
    ]
    (d / "chat.json").write_text(json.dumps(chat))
    with open(d / "cap.jsonl", "w") as f:
        for i in range(16):
            rec = {"image": f"imgs/{i % 8}.jpg", "caption": f"caption k{i} " + "x " * (i % 5)}
            f.write(json.dumps(rec) + "\n")
    return d


def _config(data, **kw):
    c = pipeline.default_data_config()
    c.sources.chat = pipeline.source_config(path=str(data / "chat.json"), task="chatml")
    c.sources.cap = pipeline.source_config(path=str(data / "cap.jsonl"), task="caption")
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _iter(cfg, tok, **kw):
    args = dict(seq_len=T, batch_size_per_host=2, image_size=S, max_images=3, seed=0)
    args.update(kw)
    return pipeline.make_train_iterator(cfg, tok, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract_and_images(data, tok):
    with _iter(_config(data), tok) as it:
        b = next(it)
        want = {
            "input_ids": (np.int32, (2, T)),
            "targets": (np.int32, (2, T)),
            "loss_mask": (np.float32, (2, T)),
            "segment_ids": (np.int32, (2, T)),
            "positions": (np.int32, (2, T)),
            "images": (np.float32, (2, 3, S, S, 3)),
            "image_valid": (np.bool_, (2, 3)),
            "image_token_index": (np.int32, (2, T)),
        }
        assert set(b) == set(want)
        for k, (dt, shape) in want.items():
            assert b[k].dtype == dt and b[k].shape == shape, k
        tok_paths = []
        for r in range(2):
            ids = b["input_ids"][r]
            assert b["image_valid"][r].sum() == (ids == IMG).sum() > 0
            # Each valid slot holds the image named inside its span, preprocessed by image.py.
            for m in np.flatnonzero(b["image_valid"][r]):
                where = np.flatnonzero(b["image_token_index"][r] // 256 == m)
                span = ids[where[0] - 1 : where[-1] + 2].tolist()
                path = tok.image_paths(span)[0]
                tok_paths.append(path)
                ref = qimage.load_image(str(data / path), S)
                np.testing.assert_array_equal(b["images"][r, m], ref)
            assert not b["images"][r][~b["image_valid"][r]].any()
        assert tok_paths
        m = it.metrics()
        assert 0.5 < m["data/packing_efficiency"] <= 1.0
        assert m["data/skipped"] == 0


def test_resume_same_batches_threads(data, tok):
    cfg = _config(data)
    with _iter(cfg, tok) as it:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
        after = _take(it, 4)
        metrics = it.metrics()
    with _iter(cfg, tok) as it2:
        it2.set_state(state)
        _same(after, _take(it2, 4))
        assert it2.metrics() == metrics


def test_resume_same_batches_worker_processes(data, tok):
    cfg = _config(data)
    with _iter(cfg, tok, worker_count=2) as it:
        first = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        after = _take(it, 3)
    with _iter(cfg, tok, worker_count=2) as it2:
        _same(first, _take(it2, 3))  # deterministic across runs
        it2.set_state(state)
        _same(after, _take(it2, 3))


def _sample_names(batches, tok):
    names = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            text = tok.decode(b["input_ids"][r][b["segment_ids"][r] > 0].tolist())
            names += re.findall(r"\b[ck]\d+\b", text)
    return names


def test_two_shards_disjoint_and_resumable(data, tok):
    cfg = _config(data, num_epochs=1, shuffle=False)
    shards = []
    for k in range(2):
        with _iter(cfg, tok, shard_index=k, shard_count=2, batch_size_per_host=1) as it:
            shards.append(_sample_names(list(it), tok))
    assert set(shards[0]).isdisjoint(shards[1])
    # Each host gets the mixture, not one task per host.
    for names in shards:
        assert {n[0] for n in names} == {"c", "k"}
    # Every record of both sources appears on exactly one host.
    assert len(shards[0]) + len(shards[1]) == len(set(shards[0]) | set(shards[1])) >= 30
    cfg = _config(data)
    with _iter(cfg, tok, shard_index=1, shard_count=2) as it:
        _take(it, 2)
        state = it.get_state()
        after = _take(it, 3)
    with _iter(cfg, tok, shard_index=1, shard_count=2) as it2:
        it2.set_state(state)
        _same(after, _take(it2, 3))


def test_resume_sequence_mixing(data, tok):
    cfg = _config(data, mixing="sequence")
    with _iter(cfg, tok) as it:
        _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        after = _take(it, 3)
    with _iter(cfg, tok) as it2:
        it2.set_state(state)
        _same(after, _take(it2, 3))


def test_sentencepiece_tokenizer(data, tmp_path):
    from qwenvl_jax.chat import SYSTEM
    from qwenvl_jax.demo.vocab import train_sentencepiece

    texts = ["Sample question? yes yes caption words", SYSTEM, "x" * 20]
    sp = train_sentencepiece(texts * 5, str(tmp_path / "sp"), vocab_size=300)
    with _iter(_config(data), sp) as it:
        b = next(it)
    assert b["image_valid"].any()
    for r in range(2):
        ids = b["input_ids"][r]
        assert (ids == sp.img_start_id).sum() == b["image_valid"][r].sum()
        sup = b["loss_mask"][r] > 0
        # Targets are the next ids of the same sample.
        seg = b["segment_ids"][r]
        same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
        np.testing.assert_array_equal(b["targets"][r][:-1][same], ids[1:][same])
        assert sup.any() and (b["targets"][r][sup] != 0).all()
        for k in range(1, seg.max() + 1):
            text = sp.decode(ids[seg == k].tolist())
            assert text.startswith("<|im_start|>system\n") or text.startswith("<img>imgs/")


def test_mixture_weights_and_sequence_mixing(data, tok):
    cfg = _config(data)
    cfg.sources.chat.weight = 3.0
    cfg.sources.cap.weight = 1.0
    with _iter(cfg, tok, batch_size_per_host=4) as it:
        _take(it, 6)
        c = it.counts()
    frac = c["chat"]["samples"] / (c["chat"]["samples"] + c["cap"]["samples"])
    assert 0.65 < frac < 0.85, c
    cfg.mixing = "sequence"
    with _iter(cfg, tok, batch_size_per_host=4) as it:
        for b in _take(it, 4):
            for r in range(4):
                ids = b["input_ids"][r]
                # A packed row holds one task: chat rows have <|im_start|>, caption rows do not.
                is_chat = (ids == 151644).any()
                caption_prompt = (ids == 31115).any()  # "Generate"
                assert is_chat != caption_prompt


def _make_tfds(root):
    import tensorflow_datasets as tfds

    class TinyRefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        # No source file to find checksums next to (pytest's importlib mode names this module
        # "data.test_pipeline", which tfds would resolve as a package through importlib_resources).
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                        "expression": tfds.features.Text(),
                        "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                buf = io.BytesIO()  # encoded bytes: encoding an array would need TensorFlow
                Image.new("RGB", (30, 20 + i), (40 * i, 0, 0)).save(buf, "PNG")
                yield (
                    i,
                    {
                        "image": buf.getvalue(),
                        "expression": f"thing t{i}",
                        "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)]},
                    },
                )

    TinyRefs(data_dir=str(root), file_format="array_record").download_and_prepare()
    return "tiny_refs:1.0.0"


def test_tfds_source(tmp_path, tok):
    name = _make_tfds(tmp_path)
    cfg = pipeline.default_data_config()
    cfg.sources.refs = pipeline.source_config(
        kind="tfds",
        name=name,
        split="train",
        data_dir=str(tmp_path),
        task="ref_grounding",
        fields={"boxes": "objects.bbox"},
        box_format="yxyx_norm",
    )
    cfg.shuffle = False
    cfg.num_epochs = 1
    with _iter(cfg, tok, batch_size_per_host=1, max_images=4, seq_len=1100) as it:
        batches = list(it)
        assert it.metrics()["data/skipped"] == 0
    rows = [b["input_ids"][0] for b in batches]
    n = sum(int((r == IMG).sum()) for r in rows)
    assert n == 6
    text = "".join(tok.decode(r[r != 151643].tolist()) for r in rows)
    # yxyx (0.1, 0.2, 0.5, 0.6) -> xyxy (200,100),(600,500) in [0, 1000).
    assert text.count("</ref><box>(200,100),(600,500)</box>") == 6
    assert all(f"<ref>thing t{i}</ref>" in text for i in range(6))
    # The image slots hold the TFDS images (a red level of 40 * i), preprocessed by image.py.
    want = {
        i: qimage.load_image(np.full((20 + i, 30, 3), (40 * i, 0, 0), np.uint8), S)
        for i in range(6)
    }
    for b in batches:
        ids = b["input_ids"][0]
        for m in np.flatnonzero(b["image_valid"][0]):
            where = np.flatnonzero(b["image_token_index"][0] == m * 256)[0]
            tail = ids[where + 256 :].tolist()
            i = int(tok.decode(tail[: tail.index(151852)]).split("t")[-1])  # "thing t{i}"
            np.testing.assert_allclose(b["images"][0, m], want[i], atol=1e-6)


# ----------------------------------------------------------------------------------- bad input
def _bad_inputs(d):
    """One source per kind of bad input, each record tagged; returns {source: (records, reason)}."""
    os.makedirs(d / "imgs")
    good = d / "imgs" / "good.jpg"
    _jpeg(good, 32, 32, (10, 20, 30))
    (d / "imgs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with open(good, "rb") as f:
        (d / "imgs" / "truncated.jpg").write_bytes(f.read()[:100])
    Image.new("CMYK", (30, 30), (0, 255, 0, 0)).save(d / "imgs" / "cmyk.jpg")
    Image.new("P", (30, 30), 3).save(d / "imgs" / "palette.png")
    Image.new("RGBA", (30, 30), (1, 2, 3, 4)).save(d / "imgs" / "alpha.png")
    Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(d / "imgs" / "deep.png")
    _jpeg(d / "imgs" / "tiny.jpg", 3, 2, (1, 1, 1))

    def conv(value, answer="ok"):
        return {
            "conversations": [
                {"from": "user", "value": value},
                {"from": "assistant", "value": answer},
            ]
        }

    def pic(p):
        return f"Picture 1: <img>{p}</img>\nWhat?"

    long_name = "x" * 256 + ".jpg"
    cases = {
        "image_missing": [conv(pic("imgs/nope.jpg"))],
        "image_corrupt": [conv(pic("imgs/corrupt.jpg")), conv(pic("imgs/truncated.jpg"))],
        "image_too_small": [conv(pic("imgs/tiny.jpg"))],
        "malformed_conversation": [
            {"conversations": [{"from": "user", "value": "hi"}]},
            {"conversations": [{"from": "user", "text": "hi"}, {"from": "assistant"}]},
            {"conversations": "nope"},
            {"id": 3},
        ],
        "unclosed_img": [conv("Picture 1: <img>imgs/good.jpg\nWhat?")],
        "image_path_too_long": [conv(pic(long_name))],
    }
    recs, expect = [], {}
    for reason, rs in cases.items():
        recs += rs
        expect[reason] = expect.get(reason, 0) + len(rs)
    # Converted images still train; they are counted as image_converted.
    converted = ["imgs/cmyk.jpg", "imgs/palette.png", "imgs/alpha.png", "imgs/deep.png"]
    recs += [conv(pic(p)) for p in converted]
    recs += [conv(pic("imgs/good.jpg"))]
    (d / "bad.json").write_text(json.dumps(recs))
    # JSON lines with an unreadable line and caption/grounding records with bad boxes.
    lines = [
        json.dumps({"image": "imgs/good.jpg", "expression": "a", "boxes": [[1, 1, 10, 10]]}),
        "{this is not json",
        json.dumps({"image": "imgs/good.jpg", "expression": "b", "boxes": [[40, 40, 60, 60]]}),
        json.dumps({"image": "imgs/good.jpg", "expression": "c", "boxes": [[-5, 2, 40, 20]]}),
        "[1, 2]",
        json.dumps({"image": "imgs/nope.jpg", "expression": "d", "boxes": [[1, 1, 2, 2]]}),
    ]
    (d / "refs.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf-8\n")
    return expect, len(converted)


def _counts_of(cfg, tok):
    cfg.num_epochs = 1
    cfg.shuffle = False
    with _iter(cfg, tok, batch_size_per_host=1, max_images=2) as it:
        batches = list(it)
        return batches, it.counts()


def test_every_bad_input_is_counted(tmp_path, tok):
    expect, n_converted = _bad_inputs(tmp_path)
    cfg = pipeline.default_data_config()
    cfg.sources.bad = pipeline.source_config(path=str(tmp_path / "bad.json"), task="chatml")
    batches, c = _counts_of(cfg, tok)
    bad = dict(c["bad"])
    # The good image and the 4 converted ones (CMYK, palette, RGBA, 16-bit) train.
    assert bad.pop("samples") == 1 + n_converted
    assert bad.pop("image_converted") == n_converted
    assert bad.pop("tokens") > 0
    assert bad == expect, bad
    # Samples dropped late (bad images) leave no trace in the batches.
    for b in batches:
        assert (b["segment_ids"] > 0).any()
        text = tok.decode(b["input_ids"][b["segment_ids"] > 0].tolist())
        assert "nope.jpg" not in text and "corrupt" not in text and "tiny" not in text
        assert not (b["image_token_index"][b["segment_ids"] == 0] >= 0).any()
        assert b["image_valid"].sum() == (b["input_ids"] == IMG).sum()

    # JSON lines: an unreadable line, a non-object line, a line that is not UTF-8, a box outside
    # the 32x32 image, a box reaching outside (clipped), a missing image.
    cfg = pipeline.default_data_config()
    cfg.sources.refs = pipeline.source_config(
        path=str(tmp_path / "refs.jsonl"), task="ref_grounding"
    )
    batches, c = _counts_of(cfg, tok)
    assert c["refs"] == {
        "samples": 2,
        "tokens": c["refs"]["tokens"],
        "box_clipped": 1,
        "bad_record": 3,
        "box_outside_image": 1,
        "image_missing": 1,
    }
    text = tok.decode(batches[0]["input_ids"][0].tolist())
    assert "<ref>c</ref><box>(0,62),(999,625)</box>" in text  # [-5, 2, 40, 20] on 32x32


def test_no_record_stops_a_run(tmp_path, tok, caplog):
    # Bad records of every kind mixed with good ones, as JSON lines: the pipeline yields batches,
    # counts each reason, logs the source and line, and never raises.
    _jpeg(tmp_path / "ok.jpg", 32, 32, (10, 20, 30))
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")

    def conv(*turns):
        return {"conversations": [{"from": f, "value": v} for f, v in turns]}

    def ask(value):
        return conv(("user", value), ("assistant", "fine"))

    good = ask("Picture 1: <img>ok.jpg</img>\nWhat is this?")
    bad = {
        "stray_img_end": [ask("a stray </img> here"), ask("<img>ok.jpg</img> then </img>")],
        "bad_image_tag": [ask("<img>a<img>ok.jpg</img>")],  # nested <img>
        "unclosed_img": [ask("Picture 1: <img>ok.jpg\nWhat?")],
        "image_path_too_long": [ask(f"<img>{'p' * 300}.jpg</img>")],
        "malformed_conversation": [
            {"conversations": []},
            conv(("user", 3), ("assistant", "x")),  # not a string
            conv(("user", "hi"), ("robot", "x")),  # a role that is not user/assistant
            conv(("user", "hi"), ("assistant", "x"), ("user", "and?")),  # ends on the user
        ],
        "image_missing": [ask("<img>gone.jpg</img>")],
        "image_corrupt": [ask("<img>junk.jpg</img>")],
    }
    lines = []
    for recs in bad.values():
        for r in recs:
            lines += [json.dumps(good).encode(), json.dumps(r).encode()]
    lines += [b"{not json", b'"a string record"', b"[1, 2]", b"\xff\xfe not utf-8"]
    lines += [json.dumps(good).encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = pipeline.default_data_config()
    cfg.sources.mixed = pipeline.source_config(path=str(tmp_path / "mixed.jsonl"), task="chatml")
    cfg.num_epochs, cfg.shuffle = 1, False
    with caplog.at_level("WARNING"), _iter(cfg, tok, batch_size_per_host=1, max_images=2) as it:
        batches = list(it)
        c, metrics = dict(it.counts()["mixed"]), it.metrics()
    assert c.pop("samples") == sum(len(r) for r in bad.values()) + 1
    assert c.pop("tokens") > 0
    want = {reason: len(recs) for reason, recs in bad.items()}
    want["bad_record"] = 4  # not JSON, not an object (twice), not UTF-8
    assert c == want, c
    assert batches and all((b["segment_ids"] > 0).any() for b in batches)
    assert metrics["data/skipped"] == sum(want.values())
    assert all(metrics[f"data/mixed/{r}"] == n for r, n in want.items())
    # Logged with the source and where the record is.
    text = caplog.text
    assert "mixed[1] (stray_img_end)" in text
    assert f"mixed.jsonl line {len(lines) - 4}" in text  # '{not json' (1-based line)


def test_strict_mode_stops_with_clear_error(tmp_path, tok):
    _bad_inputs(tmp_path)
    cfg = pipeline.default_data_config()
    cfg.sources.refs = pipeline.source_config(
        path=str(tmp_path / "refs.jsonl"), task="ref_grounding"
    )
    cfg.strict = True
    cfg.shuffle = False
    with pytest.raises(sources.DataError, match=r"'refs' record 1: bad_record"):
        with _iter(cfg, tok, batch_size_per_host=1) as it:
            _take(it, 3)


def test_multitask_config_table3_weights(data, tok):
    cfg = pipeline.multitask_config(
        caption={"path": str(data / "cap.jsonl")},
        text={"path": str(data / "cap.jsonl"), "fields": {"text": "caption"}},
    )
    assert cfg.mixing == "sequence"
    assert (cfg.sources.caption.weight, cfg.sources.text.weight) == (19.7, 7.8)  # Table 3
    with _iter(cfg, tok, batch_size_per_host=8) as it:
        batches = _take(it, 4)
        assert it.metrics()["data/skipped"] == 0
    # Weights count packed rows here: 19.7 / (19.7 + 7.8) = 72 % caption rows (with images).
    caption_rows = sum(int(b["image_valid"][r].any()) for b in batches for r in range(8))
    assert 19 <= caption_rows <= 27, caption_rows
    with pytest.raises(ValueError, match="unknown Table 3 tasks"):
        pipeline.multitask_config(captions={})


def test_partial_config_and_unknown_keys(data, tok):
    # A plain dict with only the sources works (the trainer passes config.data.spec through).
    spec = {"sources": {"cap": {"path": str(data / "cap.jsonl"), "task": "caption"}}}
    with _iter(spec, tok) as it:
        assert next(it)["input_ids"].shape == (2, T)
    with pytest.raises(ValueError, match=r"unknown data config keys \['strikt'\]"):
        _iter(dict(spec, strikt=True), tok)
    bad = {"sources": {"cap": {"path": "x", "task": "caption", "wieght": 2}}}
    with pytest.raises(ValueError, match=r"data source 'cap': unknown keys \['wieght'\]"):
        _iter(bad, tok)
    with pytest.raises(ValueError, match="data_config.sources is empty"):
        _iter({}, tok)


def test_json_errors_name_the_file(tmp_path, tok):
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    cfg = pipeline.default_data_config()
    cfg.sources.x = pipeline.source_config(path=str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        _iter(cfg, tok)
    cfg.sources.x.path = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        _iter(cfg, tok)


def test_image_bytes_decoding_modes():
    from qwenvl_jax.data import images

    def enc(im, fmt="PNG"):
        buf = io.BytesIO()
        im.save(buf, fmt)
        return buf.getvalue()

    im, conv = images.decode_image(enc(Image.new("RGB", (9, 9), (1, 2, 3))), 8)
    assert im.mode == "RGB" and not conv
    deep = Image.fromarray(np.full((9, 9), 65535, np.uint16))
    im, conv = images.decode_image(enc(deep), 8)
    assert conv and np.asarray(im)[0, 0].tolist() == [255, 255, 255]
    half = Image.fromarray(np.full((9, 9), 32896, np.uint16))  # 32896 / 65535 * 255 = 128.0
    assert np.asarray(images.decode_image(enc(half), 8)[0])[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(Exception) as e:
        images.decode_image(enc(Image.new("RGB", (9, 3))), 8)
    assert e.value.reason == "image_too_small"
