"""Golden token/label layouts of every task format, and SFT against the published finetune.py.

Expected layouts are written by hand: special ids from the spec (section 5.2), the structure of each
format (paper Appendix B), and token ids of plain text pieces from the tokenizer (verified against
the published tokenizer by its own tests). The code under test (`qwenvl_jax.data.tasks`) is never
used to build an expectation.
"""

import json
import os

import numpy as np
import pytest
from paths import FIXTURES

from qwenvl_jax.data import tasks

PREPROCESS = os.path.join(FIXTURES, "finetune", "preprocess.json")
EOD, IM_START, IM_END = 151643, 151644, 151645
REF, REF_END, BOX, BOX_END, QUAD, QUAD_END = 151851, 151852, 151853, 151854, 151855, 151856
IMG, IMG_END, IMG_PAD = 151857, 151858, 151859
NL = 198
MALFORMED = "malformed_conversation"
SYSTEM = [IM_START, 8948, NL, 2610, 525, 264, 10950, 17847, 13, IM_END, NL]


def img_span(path: str) -> list[int]:
    b = list(path.encode("utf-8"))
    return [IMG] + b + [IMG_PAD] * (256 - len(b)) + [IMG_END]


def check(ex, ids, labels):
    assert ex.ids.dtype == np.int32 and ex.labels.dtype == bool
    assert ex.ids.tolist() == ids
    assert ex.labels.astype(int).tolist() == labels


def test_caption(tok):
    ex = tasks.make_example(tok, "caption", {"caption": "a dog on grass"}, image_tag="imgs/a.jpg")
    prompt = [31115, 279, 17256, 304, 6364, 25]  # "Generate the caption in English:"
    assert tok.encode("Generate the caption in English:") == prompt
    label = tok.encode(" a dog on grass") + [EOD]
    check(ex, img_span("imgs/a.jpg") + prompt + label, [0] * 264 + [1] * len(label))
    assert ex.images == ["imgs/a.jpg"]


def test_vqa(tok):
    rec = {"question": "What animal is this?", "answer": "A dog"}
    ex = tasks.make_example(tok, "vqa", rec, image_tag="v.png", image_src="/abs/v.png")
    prefix = tok.encode("What animal is this? Answer:")
    label = tok.encode(" A dog") + [EOD]
    ids = img_span("v.png") + prefix + label
    check(ex, ids, [0] * (258 + len(prefix)) + [1] * len(label))
    assert ex.images == ["/abs/v.png"]


def test_ref_grounding_pixel_box(tok):
    # 640x480 image; the box reaches the right and bottom edges: 639.9/640 -> 999, 480/480 -> 1000
    # clipped to 999; 64/640 = 0.1 -> 100, 48/480 -> 100.
    rec = {"expression": "the dog", "boxes": [[64, 48, 639.9, 480]], "width": 640, "height": 480}
    ex = tasks.make_example(tok, "ref_grounding", rec, image_tag="g.jpg")
    prefix = img_span("g.jpg") + [REF] + tok.encode("the dog") + [REF_END]
    label = [BOX] + tok.encode("(100,100),(999,999)") + [BOX_END, EOD]
    check(ex, prefix + label, [0] * len(prefix) + [1] * len(label))


def test_grounded_caption(tok):
    rec = {"expression": "a red ball", "boxes": [0.1, 0.25, 0.5, 0.75]}
    opts = tasks.TaskOptions(box_format="xyxy_norm")
    ex = tasks.make_example(tok, "grounded_caption", rec, opts=opts, image_tag="b.jpg")
    prefix = img_span("b.jpg") + [REF] + tok.encode("This") + [REF_END]
    prefix += [BOX] + tok.encode("(100,250),(500,750)") + [BOX_END]
    label = tok.encode(" is a red ball") + [EOD]
    check(ex, prefix + label, [0] * len(prefix) + [1] * len(label))


def test_grounding_caption_with_refs(tok):
    # TFDS-style yxyx boxes in [0, 1]; one ref by character span, one by phrase.
    rec = {
        "caption": "a dog and a cat",
        "refs": [
            {"span": [0, 5], "boxes": [[0.2, 0.1, 0.4, 0.3]]},
            {"phrase": "a cat", "boxes": [[0.5, 0.5, 0.999, 0.9], [0, 0, 0.1, 0.1]]},
        ],
    }
    opts = tasks.TaskOptions(box_format="yxyx_norm")
    ex = tasks.make_example(tok, "grounding", rec, opts=opts, image_tag="c.jpg")
    prompt = tok.encode("Generate the caption in English with grounding:")
    label = tok.encode(" ") + [REF] + tok.encode("a dog") + [REF_END]
    label += [BOX] + tok.encode("(100,200),(300,400)") + [BOX_END]
    label += tok.encode(" and ") + [REF] + tok.encode("a cat") + [REF_END]
    label += [BOX] + tok.encode("(500,500),(900,999)") + [BOX_END]
    label += [BOX] + tok.encode("(0,0),(100,100)") + [BOX_END] + [EOD]
    ids = img_span("c.jpg") + prompt + label
    check(ex, ids, [0] * (258 + len(prompt)) + [1] * len(label))


def test_ocr_quads(tok):
    rec = {
        "lines": [
            {"text": "It is managed", "quad": [568, 121, 625, 131, 624, 182, 567, 172]},
            {"text": "by us", "box": [10, 20, 30, 40]},
        ]
    }
    opts = tasks.TaskOptions(box_format="xyxy_1000")
    ex = tasks.make_example(tok, "ocr", rec, opts=opts, image_tag="synthdog/1.jpg")
    prompt = tok.encode("OCR with grounding:")
    label = tok.encode(" ") + [REF] + tok.encode("It is managed") + [REF_END]
    label += [QUAD] + tok.encode("(568,121),(625,131),(624,182),(567,172)") + [QUAD_END]
    label += [REF] + tok.encode("by us") + [REF_END, BOX] + tok.encode("(10,20),(30,40)")
    label += [BOX_END, EOD]
    check(
        ex,
        img_span("synthdog/1.jpg") + prompt + label,
        [0] * (258 + len(prompt)) + [1] * len(label),
    )


def test_text(tok):
    ex = tasks.make_example(tok, "text", {"text": "Hello world."})
    label = tok.encode("Hello world.") + [EOD]
    check(ex, label, [1] * len(label))
    assert ex.images == []


def test_chatml_hand_layout(tok):
    conv = [
        {"from": "user", "value": "Picture 1: <img>x/y.jpg</img>\nWhat?"},
        {"from": "assistant", "value": "A cat."},
    ]
    ex = tasks.make_example(
        tok, "chatml", {"conversations": conv}, image_base=lambda p: "/root/" + p
    )
    user = [IM_START, 872, NL] + [24669, 220, 16, 25, 220] + img_span("x/y.jpg")
    user += tok.encode("\nWhat?") + [IM_END, NL]
    answer = tok.encode("A cat.")
    asst = [IM_START, 77091, NL] + answer + [IM_END, NL]
    labels = [1] + [0] * 8 + [1, 1]  # system: <|im_start|> ... <|im_end|> \n
    labels += [1] + [0] * (len(user) - 3) + [1, 1]
    labels += [1, 0, 0] + [1] * len(answer) + [1, 1]
    check(ex, SYSTEM + user + asst, labels)
    assert ex.images == ["/root/x/y.jpg"]


def test_chatml_matches_published_finetune(tok):
    with open(PREPROCESS, encoding="utf-8") as f:
        fx = json.load(f)
    ignore = fx["ignore_token_id"]
    assert len(fx["records"]) >= 6
    for r in fx["records"]:
        ex = tasks.make_example(tok, "chatml", {"conversations": r["conversations"]})
        assert ex.ids.tolist() == r["input_ids"], r["id"]
        want = [lab != ignore for lab in r["labels"]]
        assert ex.labels.tolist() == want, r["id"]
        # Where supervised, finetune.py's label is the token itself.
        sup = np.asarray(want)
        assert (np.asarray(r["labels"])[sup] == ex.ids[sup]).all(), r["id"]


@pytest.mark.parametrize(
    "box, fmt, wh, want",
    [
        ([0, 0, 100, 50], "xyxy_pixel", (200, 100), (0, 0, 500, 500)),
        ([10, 10, 20, 30], "xywh_pixel", (100, 100), (100, 100, 300, 400)),
        ([0.0, 0.0, 1.0, 1.0], "xyxy_norm", None, (0, 0, 999, 999)),
        ([0.1, 0.2, 0.3, 0.4], "yxyx_norm", None, (200, 100, 400, 300)),
        ([1, 2, 998, 999], "xyxy_1000", None, (1, 2, 998, 999)),
        # 1/3 of 300 px = 333.33 -> floor 333
        ([100, 100, 200, 200], "xyxy_pixel", (300, 300), (333, 333, 666, 666)),
    ],
)
def test_normalize_box(box, fmt, wh, want):
    w, h = wh or (None, None)
    assert tasks.normalize_box(box, fmt, w, h) == want


def test_box_outside_and_clipped():
    ev = []
    assert tasks.normalize_box([-10, 50, 120, 90], "xyxy_pixel", 100, 100, ev) == (0, 500, 999, 900)
    assert ev == ["box_clipped"]
    with pytest.raises(tasks.BadSample) as e:
        tasks.normalize_box([150, 10, 200, 20], "xyxy_pixel", 100, 100)
    assert e.value.reason == "box_outside_image"
    with pytest.raises(tasks.BadSample) as e:
        tasks.normalize_box([50, 10, 40, 20], "xyxy_pixel", 100, 100)
    assert e.value.reason == "bad_box"


@pytest.mark.parametrize(
    "task, rec, kw, reason",
    [
        ("chatml", {"conversations": "hi"}, {}, "malformed_conversation"),
        ("chatml", {"conversations": [{"from": "user"}]}, {}, "malformed_conversation"),
        (
            "chatml",
            {"conversations": [{"from": "bot", "value": "x"}]},
            {},
            "malformed_conversation",
        ),
        (
            "chatml",
            {"conversations": [{"from": "user", "value": "x"}]},
            {},
            "malformed_conversation",
        ),
        (
            "chatml",
            {
                "conversations": [
                    {"from": "user", "value": "<img>a.jpg"},
                    {"from": "gpt", "value": "y"},
                ]
            },
            {},
            "unclosed_img",
        ),
        (
            "chatml",
            {
                "conversations": [
                    {"from": "user", "value": "<img>" + "p" * 256 + "</img>"},
                    {"from": "assistant", "value": "y"},
                ]
            },
            {},
            "image_path_too_long",
        ),
        ("caption", {"caption": "x"}, {"image_tag": "q" * 256}, "image_path_too_long"),
        # A special token inside the span (here <ref>) is not a path: counted as a bad tag.
        (
            "chatml",
            {
                "conversations": [
                    {"from": "user", "value": "<img>a<ref>b.jpg</img>"},
                    {"from": "assistant", "value": "y"},
                ]
            },
            {},
            "bad_image_tag",
        ),
        ("caption", {"text": "x"}, {"image_tag": "a.jpg"}, "missing_field"),
        ("caption", {"caption": "x"}, {}, "missing_field"),
        ("vqa", {"question": "q", "answer": "  "}, {"image_tag": "a"}, "bad_field"),
        ("ref_grounding", {"expression": "e", "boxes": [1, 2]}, {"image_tag": "a"}, "bad_box"),
    ],
)
def test_bad_records(tok, task, rec, kw, reason):
    with pytest.raises(tasks.BadSample) as e:
        tasks.make_example(tok, task, rec, **kw)
    assert e.value.reason == reason


def test_first_assistant_message_dropped_and_aliases(tok):
    conv = [
        {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
    ]
    ex = tasks.make_example(tok, "chatml", {"conversations": conv})
    want = SYSTEM + [IM_START, 872, NL] + tok.encode("Hi") + [IM_END, NL]
    want += [IM_START, 77091, NL] + tok.encode("Hello") + [IM_END, NL]
    assert ex.ids.tolist() == want
