"""Grounding: parsing against the published helpers' fixtures, pixel scaling, drawing."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import grounding as g

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")


def test_matches_published_helpers():
    with open(os.path.join(FIXTURES, "grounding.json"), encoding="utf8") as f:
        cases = json.load(f)
    assert any(len(c["boxes"]) > 1 for c in cases)
    for c in cases:
        assert g.to_list_format(c["text"]) == c["list_format"]
        got = [
            {k: (list(v) if k == "box" else v) for k, v in b.items()}
            for b in g.boxes_with_ref(c["text"])
        ]
        assert got == c["boxes"], c["text"]


def test_parse_grounding_pixels_and_several_boxes():
    text = (
        "Here <ref> the dog </ref><box>(500,250),(999,999)</box><box>(0,0),(10,20)</box> and"
        " <ref>sign</ref><quad>(100,100),(200,100),(200,300),(100,300)</quad>"
        " plain <box>(1,1),(2,2)</box>"
    )
    recs = g.parse_grounding(text, (640, 480))
    assert [r.ref for r in recs] == ["the dog", "the dog", "sign", None]
    assert [r.kind for r in recs] == ["box", "box", "quad", "box"]
    # int(x / 1000 * w) by hand: 0.5*640=320, 0.25*480=120, 0.999*640=639.36, 0.999*480=479.52.
    assert recs[0].coords == (500, 250, 999, 999)
    assert recs[0].pixels == (320, 120, 639, 479)
    assert recs[1].pixels == (0, 0, 6, 9)
    assert recs[2].pixels == (64, 48, 128, 48, 128, 144, 64, 144)
    assert g.parse_grounding(text)[0].pixels is None


def test_first_box_as_the_grounding_script():
    # By hand from the published evaluate_grounding.py: the first match of \((.*?)\),\((.*?)\),
    # each corner two floats, else the empty box at the origin.
    assert g.first_box("<ref>x</ref><box>(1,2),(30,40)</box><box>(5,5),(6,6)</box>") == (
        1.0,
        2.0,
        30.0,
        40.0,
    )
    assert g.first_box("no tags (1.5, 2e2),( 3 ,4 ) then (5,6),(7,8)") == (1.5, 200.0, 3.0, 4.0)
    assert g.first_box("no box here") == (0.0, 0.0, 0.0, 0.0)
    assert g.first_box("(1,2),(a,4)") == (0.0, 0.0, 0.0, 0.0)
    assert g.first_box("(1,2,3),(4,5)") == (0.0, 0.0, 0.0, 0.0)
    assert g.first_box("(1,2),(3)") == (0.0, 0.0, 0.0, 0.0)
    assert g.first_box("(1,2),(3,4") == (0.0, 0.0, 0.0, 0.0)
    # The first match is taken even when it is malformed and a good box follows.
    assert g.first_box("(1),(2,3),(4,5)") == (0.0, 0.0, 0.0, 0.0)
    # The match starts at the first "(": its first corner is "(1,2", which is not a number.
    assert g.first_box("((1,2),(3,4))") == (0.0, 0.0, 0.0, 0.0)


def test_bad_grounding_text():
    with pytest.raises(ValueError, match="Unclosed <box>"):
        g.parse_grounding("<ref>a</ref><box>(1,2),(3,4)")
    with pytest.raises(ValueError, match="3 numbers"):
        g.parse_grounding("<box>(1,2),(3)</box>")
    with pytest.raises(ValueError, match="integer"):
        g.parse_grounding("<box>(a,2),(3,4)</box>")


def test_strip_grounding():
    text = (
        "A <ref>dog</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> and"
        " <ref>sign</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>."
    )
    assert g.strip_grounding(text) == "A dog and sign."


def test_latest_image():
    history = [
        ("Picture 1: <img>a.jpg</img>\nhi", "ok"),
        ("Picture 2: <img>b.jpg</img>\nand?", "x"),
    ]
    assert g.latest_image("<ref>x</ref><box>(1,2),(3,4)</box>", history) == "b.jpg"
    assert g.latest_image("no image", []) is None


def test_draw_boxes():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    out = g.draw_boxes(img, "<ref>cat</ref><box>(100,200),(600,800)</box>", width=2)
    a = np.asarray(out)
    assert out.size == (200, 100) and np.asarray(img).min() == 255  # input untouched
    # Box (20, 20)-(120, 80): the outline has the first palette colour, the middle stays white.
    blue = tuple(int(g.PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    assert tuple(a[50, 120]) == blue and tuple(a[80, 70]) == blue
    assert tuple(a[50, 70]) == (255, 255, 255)
    assert (a[20:35, 20:60] == 0).all(axis=-1).any()  # the label's black background
    quad = g.draw_boxes(
        np.full((100, 100, 3), 255, np.uint8),
        "<quad>(100,100),(900,100),(900,900),(100,900)</quad>",
    )
    assert (np.asarray(quad) != 255).any()


def test_draw_bbox_on_latest_picture(tmp_path):
    path = tmp_path / "pic.png"
    Image.new("RGB", (100, 50), (255, 255, 255)).save(path)
    history = [(f"Picture 1: <img>{path}</img>\nWhere is it?", None)]
    out = g.draw_bbox_on_latest_picture("<ref>it</ref><box>(100,100),(500,900)</box>", history)
    assert out.size == (100, 50) and (np.asarray(out) != 255).any()
    assert g.draw_bbox_on_latest_picture("no boxes", history) is None
    assert g.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", []) is None
    with pytest.raises(ValueError, match="allow_urls"):
        g.draw_bbox_on_latest_picture("<img>https://x.org/a.png</img><box>(1,2),(3,4)</box>")
