"""eval metrics: equal to the published eval_mm code on the fixtures, plus hand-calculated cases.

The goldens (tests/fixtures/eval/goldens.json) were computed by tools/make_eval_fixtures.py
running the published scripts on tests/fixtures/eval/{data/, predictions.json}.
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
from paths import FIXTURES

from qwenvl_jax.eval import benchmarks as bm
from qwenvl_jax.eval import metrics as M

ROOT = os.path.join(FIXTURES, "eval")
with open(os.path.join(ROOT, "goldens.json"), encoding="utf-8") as _f:
    GOLDENS = json.load(_f)
with open(os.path.join(ROOT, "predictions.json"), encoding="utf-8") as _f:
    PREDICTIONS = json.load(_f)
VQA = GOLDENS["vqa"]["datasets"]


def _records(name):
    return list(bm.read_records(name, ROOT))


def _names(metric):
    return [n for n, b in bm.BENCHMARKS.items() if b.metric == metric and n in PREDICTIONS]


# ------------------------------------------------------------------ against the published code
def test_vqa_tables_match_published():
    t = GOLDENS["vqa_tables"]
    assert M.VQA_CONTRACTIONS == t["contractions"]
    assert M.VQA_NUMBER_WORDS == t["number_words"]
    assert list(M.VQA_ARTICLES) == t["articles"]
    assert list(M.VQA_PUNCTUATION) == t["punctuation"]


@pytest.mark.parametrize("name", _names("vqa_score"))
def test_vqa_score_matches_published(name):
    bench, recs = bm.get(name), _records(name)
    answers = bm.load_answers(bench, ROOT)
    preds = {r["question_id"]: p.strip() for r, p in zip(recs, PREDICTIONS[name], strict=True)}
    per_question = {q: round(100 * M.vqa_accuracy(preds[q], a), 2) for q, a in answers.items()}
    assert per_question == dict(map(tuple, VQA[name]["per_question"]))
    assert bm.score(bench, recs, PREDICTIONS[name], ROOT) == VQA[name]["overall"]


def test_anls_matches_published():
    name = "docvqa_val"
    recs, answers = _records(name), bm.load_answers(bm.get(name), ROOT)
    preds = [p.strip() for p in PREDICTIONS[name]]
    got = [M.anls(p, answers[r["question_id"]]) for r, p in zip(recs, preds, strict=True)]
    assert got == [s for _, s in sorted(VQA[name]["per_question"])]
    assert bm.score(name, recs, PREDICTIONS[name], ROOT) == VQA[name]["overall"]


@pytest.mark.parametrize("name", _names("relaxed_accuracy"))
def test_relaxed_accuracy_matches_published(name):
    recs = _records(name)
    preds = [p.strip() for p in PREDICTIONS[name]]
    got = [float(M.relaxed_match(p, r["annotation"])) for p, r in zip(preds, recs, strict=True)]
    assert got == VQA[name]["per_question"]
    assert bm.score(name, recs, PREDICTIONS[name], ROOT) == VQA[name]["overall"]


@pytest.mark.parametrize("name", _names("accuracy") + _names("gqa_accuracy"))
def test_exact_match_matches_published(name):
    recs = _records(name)
    preds = [p.strip() for p in PREDICTIONS[name]]
    if name.startswith("gqa"):
        preds = [M.gqa_postprocess(p) for p in preds]
        assert preds == VQA[name]["postprocessed"]
    got = [M.exact_match(p, r["annotation"]) for p, r in zip(preds, recs, strict=True)]
    assert got == VQA[name]["per_question"]
    assert bm.score(name, recs, PREDICTIONS[name], ROOT) == VQA[name]["overall"]


@pytest.mark.parametrize("name", _names("grounding"))
def test_grounding_matches_published(name):
    golden = GOLDENS["grounding"]["datasets"][name]
    recs = _records(name)
    ious = [
        M.grounding_iou(p, r["bbox"], r["width"], r["height"])
        for p, r in zip(PREDICTIONS[name], recs, strict=True)
    ]
    # Bit-exact: the published IoU is float32 (torch), and some fixtures sit within 1e-7 of 0.5.
    for got, want in zip(ious, golden["ious"], strict=True):
        assert got == want or (math.isnan(got) and math.isnan(want)), (got, want)
    assert bm.score(name, recs, PREDICTIONS[name], ROOT) == golden["overall"]


def test_multiple_choice_matches_published():
    name = "scienceqa_test_img"
    golden = GOLDENS["multiple_choice"]["datasets"][name]
    recs = _records(name)
    losses = [M.choice_losses(p["token_losses"], p["target_lengths"]) for p in PREDICTIONS[name]]
    hits = [int(np.argmin(c) == r["answer"]) for c, r in zip(losses, recs, strict=True)]
    assert hits == golden["results"]
    assert bm.score(name, recs, losses, ROOT) == golden["overall"]


@pytest.mark.skipif(
    shutil.which("java") is None,
    reason="CIDEr's PTB tokenizer needs Java: apt-get install default-jre-headless",
)
@pytest.mark.parametrize("name", _names("cider"))
def test_cider_matches_published(name):
    pytest.importorskip("pycocoevalcap", reason="pip install 'qwenvl_jax[eval]'")
    golden = GOLDENS["caption"]["datasets"][name]
    recs = _records(name)
    preds = {r["question_id"]: p.strip() for r, p in zip(recs, PREDICTIONS[name], strict=True)}
    score, per_image = M.cider(preds, {r["question_id"]: r["annotation"] for r in recs})
    assert score == golden["CIDEr"]
    assert per_image == dict(map(tuple, golden["per_image"]))
    assert bm.score(name, recs, PREDICTIONS[name], ROOT) == golden["CIDEr"]


def test_cider_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(ImportError, match=r"qwenvl_jax\[eval\]"):
        M.cider({1: "a"}, {1: ["a"]})


# ------------------------------------------------------------------------ hand-calculated
def test_vqa_accuracy_by_hand():
    # 3 humans said "2": each of them sees 2 others agreeing (2/3), the 7 others see 3 (1).
    assert M.vqa_accuracy("two", ["2"] * 3 + ["x"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert M.vqa_accuracy("The dog.", ["dog"] * 10) == 1.0
    assert M.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    # identical answer dicts leave together: each "stop" human sees no other "stop"
    dup = [{"answer": "stop"}] * 4 + [{"answer": "go"}] * 6
    assert M.vqa_accuracy("stop", dup) == pytest.approx(0.6)
    assert M.vqa_normalize_prediction("Red, white and an apple\t") == "red white and apple"
    assert M.vqa_process_punctuation("3.5 apples.") == "3.5 apples"


def test_anls_and_levenshtein_by_hand():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.anls("abcd", ["abce"]) == 0.75
    assert M.anls("abcd", ["wxyz", "abcd"]) == 1.0
    assert M.anls("ab", ["cd"]) == 0.0  # 1 - 2/2 < 0.5
    assert M.anls("", [""]) == 1.0
    with pytest.raises(ValueError):
        M.anls("a", [])


def test_relaxed_and_exact_by_hand():
    assert M.relaxed_match("100", "104")  # |104 - 100| / 100 = 0.04
    assert not M.relaxed_match("100", "105.1")  # 0.051 relative to the prediction
    assert M.relaxed_match("50%", "0.5") and not M.relaxed_match("50%", "50")
    assert M.relaxed_match("0", "0") and not M.relaxed_match("0", "0.0")
    assert M.relaxed_accuracy(["10", "x"], ["10.4", ["y", "X"]]) == 1.0
    assert M.exact_match(" Yes ", "yes") == 1.0 and M.exact_match("yes.", "yes") == 0.0
    assert M.gqa_postprocess("The shirt is blue.") == "blue"
    assert M.gqa_postprocess("this is a chair") == ""


def test_grounding_by_hand():
    # The answer's box is read by grounding.first_box (its cases: test_grounding.py).
    # a 999 x 999 image maps the grid to pixels one to one: [0, 0, 50, 100] vs [0, 0, 100, 100]
    assert M.grounding_iou("(0,0),(50,100)", [0, 0, 100, 100], 999, 999) == pytest.approx(0.5)
    assert M.grounding_iou("(999,999),(1998,1998)", [0, 0, 10, 10], 10, 10) == 0.0
    # Only the first box counts, and an unparsable one is the empty box at the origin.
    assert M.grounding_iou("<box>(0,0),(999,999)</box>(0,0),(1,1)", [0, 0, 8, 6], 8, 6) == 1.0
    assert M.grounding_iou("(0,0),(99a,999)", [0, 0, 8, 6], 8, 6) == 0.0
    assert math.isnan(M.grounding_iou("nothing", [5, 5, 5, 5], 10, 10))
    assert M.grounding_accuracy(["(0,0),(999,999)", ""], [[0, 0, 8, 6]] * 2, [(8, 6)] * 2) == 0.5


def test_multiple_choice_by_hand():
    losses = M.choice_losses([[9.0, 1.0, 3.0], [9.0, 2.0, 1.0]], [2, 1])
    np.testing.assert_array_equal(losses, np.array([2.0, 1.0], np.float32))
    assert M.multiple_choice_accuracy([[1.0, 1.0, 2.0]], [0]) == 1.0  # ties: the first choice
    assert M.multiple_choice_accuracy([[1.0, 1.0, 2.0]], [1]) == 0.0
