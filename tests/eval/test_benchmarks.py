"""eval benchmarks: registry, readers and prompts equal to the published eval_mm scripts.

Each benchmark has a tiny fixture in its official layout under tests/fixtures/eval/data/; the
expected prompts, paths and generation lengths in goldens.json come from running the published
scripts' Dataset classes and reading their `ds_collections` (tools/make_eval_fixtures.py).
"""

import json
import os

import pytest
from paths import FIXTURES

from qwenvl_jax.eval import benchmarks as bm

ROOT = os.path.join(FIXTURES, "eval")
with open(os.path.join(ROOT, "goldens.json"), encoding="utf-8") as _f:
    GOLDENS = json.load(_f)


def _published_prompts():
    out = {}
    for group in ("vqa", "grounding", "caption"):
        for name, g in GOLDENS[group]["datasets"].items():
            out[name] = g["prompts"]
    for name, g in GOLDENS["multiple_choice"]["datasets"].items():
        # the Dataset tokenizes the prompt, then " A", " B", ... of each question
        out[name] = [t for t in g["tokenized_texts"] if not (len(t) == 2 and t[0] == " ")]
    return out


PUBLISHED_PROMPTS = _published_prompts()


def test_registry_covers_every_published_dataset():
    assert set(bm.BENCHMARKS) == set(PUBLISHED_PROMPTS)
    for name, bench in bm.BENCHMARKS.items():
        assert os.path.isfile(os.path.join(ROOT, bench.test)), name


@pytest.mark.parametrize("name", sorted(bm.BENCHMARKS))
def test_prompts_match_published(name):
    records = list(bm.read_records(name, ROOT))
    assert records, name
    assert [r["prompt"] for r in records] == PUBLISHED_PROMPTS[name]


def test_vqa_registry_matches_ds_collections():
    for name, g in GOLDENS["vqa"]["datasets"].items():
        bench, cfg = bm.get(name), g["ds_collection"]
        assert (bench.kind, bench.test, bench.train) == ("vqa", cfg["test"], cfg["train"]), name
        assert bench.question == cfg.get("question"), name
        assert bench.annotation == cfg.get("annotation"), name
        assert bench.max_new_tokens == cfg["max_new_tokens"], name
        want = "gqa_accuracy" if cfg["metric"] == "accuracy" and "gqa" in name else cfg["metric"]
        assert bench.metric == want, name
        assert bench.strip_output
    assert all(b.min_new_tokens == 1 for b in bm.BENCHMARKS.values() if b.kind == "vqa")
    assert GOLDENS["vqa"]["generate"]["min_new_tokens"] == 1


def test_grounding_and_caption_registry_match_published():
    gen = GOLDENS["grounding"]["generate"]
    for name, g in GOLDENS["grounding"]["datasets"].items():
        bench = bm.get(name)
        assert (bench.test, bench.metric, bench.strip_output) == (g["test"], "grounding", False)
        assert (bench.max_new_tokens, bench.min_new_tokens) == (
            gen["max_new_tokens"],
            gen["min_new_tokens"],
        )
    gen = GOLDENS["caption"]["generate"]
    for name, g in GOLDENS["caption"]["datasets"].items():
        bench, cfg = bm.get(name), g["ds_collection"]
        assert bench.test == cfg["test"] and (bench.train or "") == cfg["train"], name
        assert (bench.max_new_tokens, bench.min_new_tokens) == (
            gen["max_new_tokens"],
            gen["min_new_tokens"],
        )
    for name, g in GOLDENS["multiple_choice"]["datasets"].items():
        bench = bm.get(name)
        assert (bench.test, bench.metric, bench.max_new_tokens) == (
            g["ds_collection"]["test"],
            "choice_loss",
            None,
        )


def test_multiple_choice_records():
    golden = GOLDENS["multiple_choice"]["datasets"]["scienceqa_test_img"]["tokenized_texts"]
    records = list(bm.read_records("scienceqa_test_img", ROOT))
    want = []
    for r in records:
        want += [r["prompt"], *r["targets"]]
    assert want == golden
    assert "Context: N/A\n" in records[0]["prompt"]  # an empty hint
    assert [r["answer"] for r in records] == [1, 0, 3]


def test_few_shot_prefix_matches_published():
    bench = bm.get("vqav2_val")
    with open(os.path.join(ROOT, bench.train), encoding="utf-8") as f:
        shots = [json.loads(line) for line in f]
    first = next(bm.read_records(bench, ROOT))
    got = bm.few_shot_prefix(bench, shots) + first["prompt"]
    assert got == GOLDENS["vqa"]["datasets"]["vqav2_val"]["few_shot_prompt"]
    assert bm.few_shot_prefix(bm.get("flickr"), [{"image": "a.jpg", "caption": "A cat."}]) == (
        "<img>a.jpg</img>Describe the image in English: A cat."
    )
    with pytest.raises(ValueError, match="no few-shot"):
        bm.few_shot_prefix(bm.get("refcoco_val"), [{"image": "a.jpg"}])


def test_record_fields():
    vqa = next(bm.read_records("vqav2_val", ROOT))
    assert vqa["question_id"] == 1007 and vqa["annotation"] == "yes"
    assert next(bm.read_records("vqav2_testdev", ROOT))["annotation"] == ""
    ref = next(bm.read_records("refcoco_val", ROOT))
    assert (ref["question_id"], ref["width"], ref["height"]) == (0, 640, 480)
    cap = next(bm.read_records("flickr", ROOT))
    assert cap["question_id"] == 4000 and len(cap["annotation"]) == 5


def test_errors():
    with pytest.raises(KeyError, match="known: vqav2_val"):
        bm.get("vqa3")
    with pytest.raises(ValueError, match="evaluation server"):
        bm.score("docvqa_test", [], [], ROOT)
    records = list(bm.read_records("ocrvqa_val", ROOT))
    with pytest.raises(ValueError, match="1 outputs for 2 records"):
        bm.score("ocrvqa_val", records, ["x"], ROOT)
    with pytest.raises(ValueError, match="test file"):
        bm.load_answers(bm.get("ocrvqa_val"), ROOT)
    assert set(bm.DATA_SOURCES) >= {b.test.split("/")[1] for b in bm.BENCHMARKS.values()}
