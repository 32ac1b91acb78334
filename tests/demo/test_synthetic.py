"""The synthetic world: deterministic files, annotations that agree with the pixels."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.demo import synthetic

BOX_RE = re.compile(r"<ref>(.*?)</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return synthetic.generate(str(out), n_train=40, n_heldout=12, seed=3)


def _load(manifest, name):
    with open(manifest["files"][name]) as f:
        return json.load(f)


def test_norm_box_by_hand():
    # 28/112 = 0.25 -> 250, 56/112 -> 500, 84/112 -> 750, 112/112 -> 1000 clipped to 999.
    assert synthetic.norm_box((28, 56, 84, 112), 112) == (250, 500, 750, 999)
    assert synthetic.box_text((0, 1, 2, 3), 100) == "<box>(0,10),(20,30)</box>"
    assert (
        synthetic.quad_text((10, 20, 30, 40), 100)
        == "<quad>(100,200),(300,200),(300,400),(100,400)</quad>"
    )


def test_deterministic_and_seed_dependent(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), n_train=6, n_heldout=2, seed=1)
    b = synthetic.generate(str(tmp_path / "b"), n_train=6, n_heldout=2, seed=1)
    synthetic.generate(str(tmp_path / "c"), n_train=6, n_heldout=2, seed=2)
    for name in a["files"]:
        ta = open(a["files"][name]).read().replace(str(tmp_path / "a"), "X")
        tb = open(b["files"][name]).read().replace(str(tmp_path / "b"), "X")
        assert ta == tb, name
    img = "images/train/000003.png"
    pa, pb, pc = (open(tmp_path / d / img, "rb").read() for d in "abc")
    assert pa == pb and pa != pc


def test_boxes_match_pixels():
    # The annotation must agree with what is drawn: each object's pixels span exactly its box.
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = synthetic.make_scene(rng)
        pix = np.asarray(synthetic.render(scene)).astype(int)
        for o in scene.objects:
            if o.kind == "word":
                # Ink: neither the background nor a (solid, not anti-aliased) shape colour.
                ink = (pix != scene.background).any(-1)
                for c in synthetic.COLOURS.values():
                    ink &= (pix != c).any(-1)
                ys, xs = np.nonzero(ink)
                tol = 1
            else:
                tol = 1  # polygon edges round to the pixel grid
                ys, xs = np.nonzero((pix == synthetic.COLOURS[o.colour]).all(-1))
            x1, y1, x2, y2 = o.box
            got = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            np.testing.assert_allclose(got, o.box, atol=tol, err_msg=f"{o} in {scene}")
            assert 0 <= x1 < x2 <= scene.size and 0 <= y1 < y2 <= scene.size


def test_unique_types_and_colours():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = synthetic.make_scene(rng)
        kinds = [o.kind for o in scene.shapes]
        colours = [o.colour for o in scene.shapes]
        assert len(set(kinds)) == len(kinds) and len(set(colours)) == len(colours)
        assert 1 <= len(kinds) <= 3


def test_official_format(data):
    for name in data["files"]:
        if not name.startswith("stage"):
            continue
        samples = _load(data, name)
        assert len(samples) == data["counts"][name] > 0
        ids = [s["id"] for s in samples]
        assert len(set(ids)) == len(ids)
        for s in samples:
            conv = s["conversations"]
            assert [m["from"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
            paths = re.findall(r"Picture (\d+): <img>(.*?)</img>\n", conv[0]["value"])
            assert paths and [int(k) for k, _ in paths] == list(range(1, len(paths) + 1))
            root = os.path.dirname(data["files"][name])
            for _, p in paths:
                # Relative to the JSON file's directory, and short enough for the demo model's
                # 36-position <img> spans.
                assert not os.path.isabs(p) and os.path.exists(os.path.join(root, p))
                assert len(p.encode()) <= 35
            for m in conv[1:]:
                assert "<img>" not in m["value"]


def test_grounding_answers_match_scene(data):
    # Re-derive the boxes from the image file: the referred colour's pixels must fill the box.
    n = 0
    for s in _load(data, "stage1_train"):
        conv = s["conversations"]
        path = re.search(r"<img>(.*?)</img>", conv[0]["value"]).group(1)
        root = os.path.dirname(data["files"]["stage1_train"])
        pix = np.asarray(Image.open(os.path.join(root, path)).convert("RGB")).astype(int)
        size = pix.shape[0]
        for phrase, *box in BOX_RE.findall(conv[1]["value"]):
            words = phrase.split()
            if "word" in words:
                continue
            colour = words[1]
            ys, xs = np.nonzero((pix == synthetic.COLOURS[colour]).all(-1))
            want = synthetic.norm_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), size)
            np.testing.assert_allclose([int(v) for v in box], want, atol=10)
            n += 1
    assert n > 10


def test_eval_records(data):
    records = _load(data, "eval")
    tasks = {r["task"] for r in records}
    assert tasks == set(synthetic.EVAL_TASKS)
    for r in records:
        root = os.path.dirname(data["files"]["eval"])
        assert os.path.exists(os.path.join(root, r["images"][0])) and "heldout" in r["images"][0]
        if r["task"] == "grounding":
            x1, y1, x2, y2 = r["box"]
            assert r["answer"] == f"<ref>{r['phrase']}</ref><box>({x1},{y1}),({x2},{y2})</box>"
            assert r["prompt"] == f"<ref>{r['phrase']}</ref>"
        if r["task"] == "vqa":
            assert r["answer"] in set(synthetic.COLOURS) | set(synthetic.SHAPES) | set(
                synthetic.NUMBERS
            )


def test_corpus_has_no_paths(data):
    text = open(data["files"]["corpus"]).read()
    assert "<img>" not in text and ".png" not in text
    assert "<ref>" in text and "<quad>" in text and "Describe the image" in text


def test_drills_ask_every_colour_and_every_object(data):
    """The drills: one single-turn "What colour is the <shape>?" per shape of every picture (its
    colour the answer), and one referring phrase per object (its box the answer)."""
    man = data
    world = synthetic.WorldConfig(**man["settings"]["world"])
    colours, grounds = [], []
    for i in range(man["settings"]["n_train"]):
        scene = synthetic.make_scene(synthetic._scene_rng(3, "train", i, 0), world)
        pic = f"Picture 1: <img>images/train/{i:06d}.png</img>\n"
        colours += [(pic + f"What colour is the {o.kind}? Answer:", o.colour) for o in scene.shapes]
        for o in scene.objects:
            x1, y1, x2, y2 = (min(int(v / scene.size * 1000), 999) for v in o.box)
            ref = f"<ref>{o.phrase}</ref>"
            grounds.append((pic + ref, f"{ref}<box>({x1},{y1}),({x2},{y2})</box>"))
    for name, want in (("drill_train", colours), ("drill_ground_train", grounds)):
        got = [tuple(m["value"] for m in s["conversations"]) for s in _load(data, name)]
        assert got == want and man["counts"][name] == len(want)


def test_shuffle_labels(tmp_path, data):
    kw = dict(n_train=40, n_heldout=12, seed=3)
    shuf = synthetic.generate(str(tmp_path / "s"), shuffle_labels=True, **kw)
    for stage in ("stage1", "stage2", "drill", "drill_ground", "stage3"):
        true = _load(data, f"{stage}_train")
        fake = _load(shuf, f"{stage}_train")

        def answers(samples):
            return [
                m["value"] for s in samples for m in s["conversations"] if m["from"] == "assistant"
            ]

        assert sorted(answers(true)) == sorted(answers(fake))
        changed = np.mean([a != b for a, b in zip(answers(true), answers(fake), strict=True)])
        assert changed > 0.5, stage
        assert [s["id"] for s in true] == [s["id"] for s in fake]
    # Held-out data keeps the true labels.
    a = open(data["files"]["eval"]).read().replace(os.path.dirname(data["files"]["eval"]), "X")
    b = open(shuf["files"]["eval"]).read().replace(str(tmp_path / "s"), "X")
    assert a == b


def test_manifest_reuse_and_mismatch(tmp_path):
    out = str(tmp_path / "d")
    m1 = synthetic.generate(out, n_train=4, n_heldout=2)
    mtime = os.path.getmtime(m1["files"]["stage1_train"])
    assert synthetic.generate(out, n_train=4, n_heldout=2) == m1
    assert os.path.getmtime(m1["files"]["stage1_train"]) == mtime
    with pytest.raises(FileExistsError, match="other settings"):
        synthetic.generate(out, n_train=5, n_heldout=2)


def test_bad_world_config():
    with pytest.raises(ValueError, match="max_shapes"):
        synthetic.WorldConfig(grid=1)
    with pytest.raises(ValueError, match="unknown task"):
        synthetic.task_sample("nope", synthetic.make_scene(np.random.default_rng(0)), None)


def test_every_picture_gives_every_task(data):
    # Stage 1: caption, grounding and grounded caption of each picture; stage 2: each task the
    # picture supports (the OCR tasks only where it holds a word).
    for stage, want in (("stage1", {"caption", "grounding", "grounded_caption"}), ("stage2", None)):
        tasks: dict = {}
        for s in _load(data, f"{stage}_train"):
            _, task, index = s["id"].split("-")
            tasks.setdefault(index, []).append(task)
        assert len(tasks) == 40
        for got in tasks.values():
            assert len(got) == len(set(got))
            if want is not None:
                assert set(got) == want
            else:
                has_word = "ocr" in got
                assert set(got) == set(synthetic.TASKS if has_word else synthetic.TASKS[:4])
    assert 0 < sum("-ocr-" in s["id"] for s in _load(data, "stage2_train")) < 40
