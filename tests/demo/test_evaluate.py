"""Evaluation metrics against hand calculations, and the plots."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.demo import evaluate


def test_iou_by_hand():
    # [0,10]x[0,10] and [5,15]x[0,10]: intersection 5*10 = 50, union 100 + 100 - 50 = 150.
    assert evaluate.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert evaluate.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert evaluate.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert evaluate.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_normalize_answer():
    assert evaluate.normalize_answer(" The Red. ") == "red"
    assert evaluate.normalize_answer("a blue square!") == "blue square"


def test_cider_d_by_hand():
    # Two items with one reference each: "a b" and "a c". N = 2 items, so idf = log 2 - log df:
    # "a" has df 2 (weight 0); "b", "c", "a b", "a c" have df 1 (weight log 2).
    refs = [["a b"], ["a c"]]
    # Item 1, candidate == reference: unigram cosine 1 ("a" weighs 0), bigram cosine 1, no
    # 3-/4-grams (0). Mean over n = 2/4, times 10 = 5. Item 2, candidate "a b" vs "a c": shares
    # only "a", whose weight is 0 -> 0. Corpus score 2.5.
    mean, per = evaluate.cider_d(["a b", "a b"], refs)
    np.testing.assert_allclose(per, [5.0, 0.0], atol=1e-12)
    assert mean == pytest.approx(2.5)
    # Length penalty (the published code counts bigrams): candidate "b" has 0 bigrams, the reference
    # 1, delta = -1 -> factor exp(-1 / 72); unigram cosine is 1, the rest 0 -> 10/4 * exp(-1/72).
    _, per = evaluate.cider_d(["b", "a b"], refs)
    assert per[0] == pytest.approx(2.5 * math.exp(-1 / 72))
    # Clipping: a repeated word counts at most as often as the reference weight allows:
    # cand "b b" has tf 2 -> vec 2 log2, ref 1 log2: min(2l, l) * l / (2l * l) = 1/2 on unigrams;
    # bigram "b b" absent from ref -> 0; both have 1 bigram, no length penalty. -> 10 * 0.5 / 4.
    _, per = evaluate.cider_d(["b b", "a b"], refs)
    assert per[0] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="reference sets"):
        evaluate.cider_d(["x"], [])


def test_cider_identical_long_captions():
    refs = [["a red circle and a blue square"], ["the word cat and a green triangle"]]
    mean, per = evaluate.cider_d([r[0] for r in refs], refs)
    # A candidate equal to its reference has the same tf-idf vector: every cosine is 1 (each order
    # keeps a non-zero norm through n-grams of df 1), no length penalty -> 10 each.
    np.testing.assert_allclose(per, [10.0, 10.0])


def _rec(id_, task, answer="", **kw):
    return {"id": id_, "task": task, "images": [], "prompt": "", "answer": answer, **kw}


def _records():
    return [
        _rec("g0", "grounding", box=[0, 0, 100, 100]),
        _rec("g1", "grounding", box=[0, 0, 100, 100]),
        _rec("v0", "vqa", "red"),
        _rec("v1", "vqa", "blue"),
        _rec("o0", "ocr", "cat"),
        _rec("c0", "caption", "a b"),
        _rec("c1", "caption", "a c"),
    ]


def test_score():
    preds = [
        "<ref>x</ref><box>(0,0),(100,60)</box>",  # IoU 0.6 -> correct
        "<ref>x</ref><box>(0,0),(100,40)</box>",  # IoU 0.4 -> wrong
        "Red.",
        "green",
        "cats",
        "a b",
        "a b",
    ]
    m = evaluate.score(_records(), preds)
    assert m["grounding_acc"] == 0.5
    assert m["mean_iou"] == pytest.approx(0.5)
    # Both predicted boxes are centred inside the true one: found, however loose.
    assert m["grounding_point_acc"] == 1.0
    assert m["vqa_acc"] == 0.5
    assert m["ocr_em"] == 0.0
    assert m["caption_em"] == 0.5
    assert m["caption_cider"] == pytest.approx(2.5)
    assert m["n_grounding"] == 2 and m["n_caption"] == 2
    with pytest.raises(ValueError, match="predictions"):
        evaluate.score(_records(), preds[:-1])
    bad = _records()
    bad[0]["box"] = [1, 2]
    with pytest.raises(ValueError, match="'g0'.*box"):
        evaluate.score(bad, preds)


def test_centre_inside():
    box = [0, 0, 100, 100]
    assert evaluate.centre_inside((40, 40, 60, 60), box)  # IoU 0.04, but on the object
    assert evaluate.centre_inside((0, 0, 100, 100), box)
    assert not evaluate.centre_inside((90, 0, 300, 100), box)  # centre x 195
    assert not evaluate.centre_inside((0, 0, 0, 0), box)  # nothing parsed
    assert not evaluate.centre_inside((60, 60, 40, 40), box)  # inverted: not a box


def test_run_and_table():
    recs = _records()

    answers = {r["id"]: r["answer"] for r in recs}
    answers["g0"] = answers["g1"] = "<box>(0,0),(100,100)</box>"
    it = iter(recs)

    def perfect(images, prompts):
        return [answers[next(it)["id"]] for _ in prompts]

    m, preds = evaluate.run(perfect, recs, batch_size=3, progress=None)
    assert m["grounding_acc"] == m["vqa_acc"] == m["ocr_em"] == m["caption_em"] == 1.0
    assert len(preds) == len(recs)
    table = evaluate.format_table(m)
    assert "grounding acc" in table and "centre in box" in table and "1.000" in table
    with pytest.raises(ValueError, match="answers"):
        evaluate.run(lambda i, p: [], recs, progress=None)


def test_load_records(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_records()))
    assert len(evaluate.load_records(str(path), per_task=1)) == 4
    path.write_text(json.dumps([{"task": "vqa"}]))
    with pytest.raises(ValueError, match="record 0.*lacks"):
        evaluate.load_records(str(path))


def test_plots(tmp_path):
    img = tmp_path / "x.png"
    Image.new("RGB", (112, 112), "white").save(img)
    recs = [
        {"task": "grounding", "images": [str(img)], "box": [100, 100, 500, 500], "phrase": "p"},
        {"task": "vqa", "images": [str(img)]},
    ]
    out = evaluate.plot_boxes(
        recs, ["<box>(120,100),(500,480)</box>", "red"], str(tmp_path / "b.png")
    )
    assert Image.open(out).size[0] > 100
    out = evaluate.plot_loss_curves(
        {"stage1": [(1, 5.0), (2, 4.0)], "stage2": [(1, 3.0), (2, 2.0)]}, str(tmp_path / "l.png")
    )
    assert Image.open(out).size[0] > 100
    with pytest.raises(ValueError, match="no grounding"):
        evaluate.plot_boxes(recs[1:], ["red"], str(tmp_path / "c.png"))


def test_prior_predictions_by_hand(tmp_path):
    def conv(user, assistant):
        turns = [{"from": "user", "value": user}, {"from": "assistant", "value": assistant}]
        return {"id": "x", "conversations": turns}

    pic = "Picture 1: <img>images/train/000001.png</img>\n"
    two = pic + "Picture 2: <img>images/train/000002.png</img>\n"
    q = "What colour is the circle? Answer:"
    ref = "<ref>the red circle</ref>"
    train = [
        conv(pic + q, "red"), conv(pic + q, "blue"), conv(pic + q, "red"),
        conv(two + q, "blue"), conv(two + q, "blue"),  # two-picture turns are not counted
        conv(pic + ref, ref + "<box>(0,0),(100,100)</box>"),
        conv(pic + ref, ref + "<box>(10,20),(300,50)</box>"),
        conv(pic + ref, ref + "<box>(20,10),(200,90)</box>"),
    ]  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train))
    records = [
        {"task": "vqa", "prompt": q, "answer": "blue", "images": ["a.png"]},
        {"task": "grounding", "prompt": ref, "answer": "", "box": [0, 0, 1, 1], "images": ["a"]},
        {"task": "ocr", "prompt": "never seen", "answer": "cat", "images": ["a.png"]},
    ]
    got = evaluate.prior_predictions([str(path)], records)
    # The most frequent answer (red 2 : blue 1), the coordinate-wise median box, "" when unseen.
    assert got == ["red", ref + "<box>(10,10),(200,90)</box>", ""]
    table = evaluate.format_table({"vqa_acc": 0.5, "n_vqa": 4}, baseline={"vqa_acc": 0.25})
    assert table.splitlines()[-1].split() == ["VQA", "accuracy", "0.500", "0.250", "4"]
