"""A.2 / A.3: VQAv2 max-confidence answers, GRIT's greedy span cleaning, and referring boxes on the
grid of the original image, checked by drawing them on generated images with known objects."""

import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import grounding
from qwenvl_jax.data import tasks
from qwenvl_jax.prep import __main__ as prep_main
from qwenvl_jax.prep import boxes, grit
from qwenvl_jax.prep.steps import Context, Drop


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


# ------------------------------------------------------------------------------------ VQAv2
def _ans(*pairs):
    return [{"answer": a, "answer_confidence": c, "answer_id": i} for i, (a, c) in enumerate(pairs)]


def test_vqav2_keeps_the_max_confidence_answer(tmp_path):
    cases = [
        # (answers, official, expected): 3 sure "3" (3.0) beat 4 unsure "2" (2.0) and 3 "no"s.
        (_ans(*[("2", "maybe")] * 4, *[("3", "yes")] * 3, *[("4", "no")] * 3), "2", "3"),
        # Equal confidence (2.0 each): more workers win (4 x maybe vs 2 x yes).
        (_ans(*[("red", "maybe")] * 4, *[("blue", "yes")] * 2), "blue", "red"),
        # Equal confidence and workers: the official answer.
        (_ans(("cat", "yes"), ("dog", "yes")), "dog", "dog"),
        # Trailing spaces are one answer.
        (_ans(("yes ", "yes"), ("yes", "maybe"), ("no", "yes")), "yes", "yes"),
    ]
    qs = {"data_subtype": "train2014", "questions": []}
    anns = {"data_subtype": "train2014", "annotations": []}
    for i, (answers, official, _) in enumerate(cases):
        qs["questions"].append({"question_id": 10 + i, "image_id": 7 + i, "question": f"q{i}?"})
        anns["annotations"].append(
            {
                "question_id": 10 + i,
                "image_id": 7 + i,
                "answers": answers,
                "multiple_choice_answer": official,
            }  # fmt: skip
        )
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    out = tmp_path / "out"
    argv = ["vqav2", f"--input={tmp_path / 'q.json'}", f"--annotations={tmp_path / 'a.json'}",
            f"--image_root={tmp_path}", f"--output={out}"]  # fmt: skip
    assert prep_main.main(argv) == 0
    lines = _lines(out / "vqav2.jsonl")
    assert [r["answer"] for r in lines] == [c[2] for c in cases]
    assert lines[0]["image"] == "train2014/COCO_train2014_000000000007.jpg"
    assert lines[0]["question"] == "q0?" and lines[0]["question_id"] == 10
    report = json.loads((out / "report.json").read_text())
    assert report["steps"]["answer"]["differs_from_official"] == 2
    src = json.loads((out / "mixture.json").read_text())["sources"]["vqav2"]
    assert src["task"] == "vqa" and src["image_root"] == str(tmp_path)


# ------------------------------------------------------------------------------------- GRIT
def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.parametrize(
    "spans",
    [
        # "a man in a red hat next to a dog": the man with his hat, the man, the hat, the dog.
        [[0, 18, 0.1, 0.1, 0.6, 0.9], [0, 5, 0.1, 0.1, 0.5, 0.9], [9, 18, 0.2, 0.1, 0.4, 0.3],
         [27, 32, 0.6, 0.5, 0.9, 0.9]],
        # A chain of partial overlaps and one span with two boxes.
        [[0, 4, 0, 0, 1, 1], [2, 8, 0, 0, 1, 1], [6, 12, 0, 0, 1, 1], [10, 14, 0, 0, 1, 1],
         [13, 20, 0, 0, 0.5, 0.5], [13, 20, 0.5, 0.5, 1, 1]],
        # Deep nesting: each span inside the previous one.
        [[0, 30, 0, 0, 1, 1], [2, 28, 0, 0, 1, 1], [4, 26, 0, 0, 1, 1], [6, 8, 0, 0, 1, 1],
         [10, 12, 0, 0, 1, 1]],
    ],
)  # fmt: skip
def test_grit_greedy_keeps_the_most_spans_with_none_nested(spans):
    kept = grit.greedy_spans(spans)
    for a, b in itertools.combinations(kept, 2):
        assert not _overlap(a, b)
    # The largest set of pairwise non-overlapping spans, by trying every subset.
    distinct = sorted({(s[0], s[1]) for s in spans})
    best = max(
        len(c)
        for n in range(len(distinct) + 1)
        for c in itertools.combinations(distinct, n)
        if all(not _overlap(a, b) for a, b in itertools.combinations(c, 2))
    )
    assert len(kept) == best
    assert sum(len(b) for *_, b in kept) >= len(kept)  # grouped boxes travel with their span


def _png(size, colour=(200, 200, 200), rects=()):
    im = Image.new("RGB", size, colour)
    for (x1, y1, x2, y2), c in rects:
        im.paste(c, (x1, y1, x2, y2))
    return im


def _png_bytes(im):
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_grit_record_text_boxes_and_resized_copies(tmp_path):
    caption = "a man in a red hat next to a dog"
    man, dog = (40, 20, 240, 380), (300, 200, 380, 380)
    im = _png((400, 400), rects=[(man, (250, 0, 0)), (dog, (0, 0, 250))])
    spans = [[0, 18, 0.1, 0.05, 0.6, 0.95], [0, 5, 0.1, 0.05, 0.6, 0.95],
             [9, 18, 0.2, 0.05, 0.4, 0.2], [27, 32, 0.75, 0.5, 0.95, 0.95]]  # fmt: skip
    rec = {"key": "g1", "caption": caption, "ref_exps": spans, "width": 800, "height": 800,
           "image": _png_bytes(im), "image_ext": "png"}  # fmt: skip
    ctx = Context("s", 0)
    (out,) = grit.clean_grit(dict(rec), ctx, span_fields=("ref_exps",))
    assert [r["span"] for r in out["refs"]] == [[0, 5], [9, 18], [27, 32]]
    assert out["text"] == (
        "<ref>a man</ref><box>(100,50),(600,950)</box> in <ref>a red hat</ref>"
        "<box>(200,50),(400,200)</box> next to <ref>a dog</ref><box>(750,500),(950,950)</box>"
    )
    # The trainer's grounding task builds the same text from the record.
    _, label, _ = tasks.pretraining_texts(
        "grounding", out, tasks.TaskOptions(box_format="xyxy_1000")
    )
    assert label == " " + out["text"]
    # A copy resized to another shape (img2dataset's center_crop / border) is refused; one of the
    # same shape (keep_ratio) is fine: normalised boxes do not depend on the scale.
    squeezed = dict(rec, image=_png_bytes(im.resize((400, 300))))
    with pytest.raises(Drop, match="aspect_changed"):
        list(grit.clean_grit(squeezed, ctx, span_fields=("ref_exps",)))
    half = dict(rec, image=_png_bytes(im.resize((200, 200))))
    (o2,) = grit.clean_grit(half, ctx, span_fields=("ref_exps",))
    assert o2["text"] == out["text"]


# ---------------------------------------------------------------------------- referring data
OBJECTS = {  # image -> (size, [(name, (x, y, w, h) pixels, colour)])
    "a.png": ((400, 300), [("the red square", (30, 40, 120, 100), (230, 20, 20)),
                           ("the blue bar", (250, 10, 40, 280), (20, 20, 230))]),
    "b.png": ((640, 480), [("the green box", (400, 300, 200, 150), (20, 200, 20))]),
}  # fmt: skip


@pytest.fixture
def refcoco(tmp_path):
    """COCO-style instances and RefCOCO refs over generated images with known objects."""
    root = tmp_path / "images"
    root.mkdir()
    images, anns, refs = [], [], []
    for i, (name, (size, objs)) in enumerate(OBJECTS.items()):
        rects = [((x, y, x + w, y + h), c) for _, (x, y, w, h), c in objs]
        _png(size, rects=rects).save(root / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        for phrase, bbox, _ in objs:
            anns.append({"id": len(anns), "image_id": i, "bbox": list(bbox), "category_id": 1})
            refs.append({"ref_id": len(refs), "ann_id": anns[-1]["id"], "image_id": i,
                         "split": "train", "sentences": [{"sent": phrase}]})  # fmt: skip
    bad = [  # (bbox, image, expected reason)
        ([350, 250, 100, 100], 0, "box_outside_image"),
        ([10, 10, 0, 50], 0, "box_inverted"),
    ]
    for bbox, i, _ in bad:
        anns.append({"id": len(anns), "image_id": i, "bbox": bbox, "category_id": 1})
        refs.append({"ref_id": len(refs), "ann_id": anns[-1]["id"], "image_id": i,
                     "split": "train", "sentences": [{"sent": "bad"}]})  # fmt: skip
    # 1 px past the right edge (COCO float rounding): clipped and kept.
    anns.append({"id": len(anns), "image_id": 1, "bbox": [540.5, 0, 100.5, 50], "category_id": 1})
    refs.append({"ref_id": len(refs), "ann_id": anns[-1]["id"], "image_id": 1, "split": "train",
                 "sentences": [{"sent": "the top right corner"}]})  # fmt: skip
    refs.append({"ref_id": len(refs), "ann_id": 0, "image_id": 0, "split": "val",
                 "sentences": [{"sent": "not in train"}]})  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    return tmp_path


def _run_refexp(d, out, *extra):
    return prep_main.main(["refexp", "--format=refcoco", f"--input={d / 'refs.json'}",
                           f"--instances={d / 'instances.json'}", f"--image_root={d / 'images'}",
                           f"--output={out}", *extra])  # fmt: skip


def test_refcoco_boxes_land_on_the_objects(refcoco, tmp_path):
    assert _run_refexp(refcoco, tmp_path / "out") == 0
    lines = _lines(tmp_path / "out" / "refexp.jsonl")
    assert [r["expression"] for r in lines] == [
        "the red square", "the blue bar", "the green box", "the top right corner"
    ]  # fmt: skip
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["boxes"]["dropped"] == {"box_outside_image": 1, "box_inverted": 1}
    assert (
        "refs/3_0 (a.png): box [350, 250, 100, 100]"
        in report["examples"]["boxes"]["box_outside_image"]
    )
    assert lines[3]["boxes"] == [[844, 0, 999, 104]]  # clipped at the edge, floor(v / 640 * 1000)
    drawn_dir = tmp_path / "drawn"
    drawn_dir.mkdir()
    for rec in lines[:3]:
        size, objs = OBJECTS[rec["image"]]
        (_, (x, y, w, h), colour) = next(o for o in objs if o[0] == rec["expression"])
        # The training text, as the trainer builds it from the record.
        prefix, label, _ = tasks.pretraining_texts(
            "ref_grounding", rec, tasks.TaskOptions(box_format="xyxy_1000")
        )
        assert prefix + label == rec["text"]
        for frame in (size, (448, 448), (size[0] // 3, size[1] // 3)):  # original and resized
            img = Image.open(refcoco / "images" / rec["image"]).convert("RGB")
            img = img.resize(frame, Image.BILINEAR)  # no overshoot at the edges
            (gb,) = grounding.parse_grounding(rec["text"], frame)
            assert gb.ref == rec["expression"]
            px1, py1, px2, py2 = gb.pixels
            sx, sy = frame[0] / size[0], frame[1] / size[1]
            # Within one grid step (and one pixel of resampling) of the object's true edges.
            tol_x, tol_y = frame[0] / 1000 + 1 + sx, frame[1] / 1000 + 1 + sy
            assert abs(px1 - x * sx) <= tol_x and abs(px2 - (x + w) * sx) <= tol_x
            assert abs(py1 - y * sy) <= tol_y and abs(py2 - (y + h) * sy) <= tol_y
            # Every pixel inside the box (a 2 px margin for resampling) is the object's colour.
            arr = np.asarray(img)
            inner = arr[py1 + 2 : py2 - 2, px1 + 2 : px2 - 2].reshape(-1, 3).astype(int)
            assert np.abs(inner - colour).max() <= 8, (rec["expression"], frame)
            drawn = np.asarray(grounding.draw_boxes(img, [gb], width=1))
            path = drawn_dir / f"{rec['key']}_{frame[0]}x{frame[1]}.png"
            Image.fromarray(drawn).save(path)
            # The outline is drawn on the object's border: changed pixels hug the box edges.
            changed = np.argwhere(np.any(drawn != arr, axis=-1))
            on_edge = (
                (np.abs(changed[:, 1] - px1) <= 1) | (np.abs(changed[:, 1] - px2) <= 1)
                | (np.abs(changed[:, 0] - py1) <= 1) | (np.abs(changed[:, 0] - py2) <= 1)
            )  # fmt: skip
            label_area = (changed[:, 0] < py1 + 40) & (changed[:, 1] < px1 + 200)
            assert on_edge.sum() >= 2 * ((px2 - px1) + (py2 - py1)) - 8
            assert np.all(on_edge | label_area)
    assert len(os.listdir(drawn_dir)) == 9


def test_resized_image_is_refused_naming_the_sample(refcoco, tmp_path, capsys):
    # Someone resized b.png after annotation: its boxes would be in the wrong frame.
    Image.open(refcoco / "images" / "b.png").resize((320, 240)).save(refcoco / "images" / "b.png")
    assert _run_refexp(refcoco, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["boxes"]["dropped"]["size_mismatch"] == 2
    capsys.readouterr()
    assert _run_refexp(refcoco, tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "size_mismatch" not in err
    assert "refs/2_0 (b.png): annotation is for a 640x480 image but the file is 320x240" in err


def test_grid_box_checks(tmp_path):
    assert boxes.grid_box([0, 0, 400, 300], 400, 300) == (0, 0, 999, 999)
    assert boxes.grid_box([10, 20, 30, 40], 400, 300, fmt="xywh") == (25, 66, 100, 200)
    for box, reason in [
        ([5, 5, 5, 9], "box_inverted"),
        ([9, 5, 5, 9], "box_inverted"),
        ([0, 0, 402, 10], "box_outside_image"),
        ([-2, 0, 10, 10], "box_outside_image"),
        ([0, 0, float("nan"), 1], "bad_box"),
        ([1, 2, 3], "bad_box"),
    ]:
        with pytest.raises(boxes.BoxError, match="sample 7") as e:
            boxes.grid_box(box, 400, 300, sample="sample 7")
        assert e.value.reason == reason


def test_visual_genome_regions(tmp_path):
    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    _png((500, 333), rects=[((100, 50, 300, 250), (250, 0, 0))]).save(root / "VG_100K" / "1.jpg")
    regions = [{"id": 1, "regions": [
        {"region_id": 11, "image_id": 1, "phrase": "a red block", "x": 100, "y": 50,
         "width": 200, "height": 200},
        {"region_id": 12, "image_id": 1, "phrase": "off the image", "x": 480, "y": 300,
         "width": 100, "height": 100},
    ]}]  # fmt: skip
    meta = [{"image_id": 1, "width": 500, "height": 333,
             "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg"}]  # fmt: skip
    (tmp_path / "regions.json").write_text(json.dumps(regions))
    (tmp_path / "image_data.json").write_text(json.dumps(meta))
    argv = ["refexp", "--format=vg", f"--input={tmp_path / 'regions.json'}",
            f"--image_data={tmp_path / 'image_data.json'}", f"--image_root={root}",
            f"--output={tmp_path / 'out'}"]  # fmt: skip
    assert prep_main.main(argv) == 0
    (rec,) = _lines(tmp_path / "out" / "refexp.jsonl")
    assert rec["image"] == "VG_100K/1.jpg"
    assert rec["text"] == "<ref>a red block</ref><box>(200,150),(600,750)</box>"


def test_refexp_mixture_entries(refcoco, tmp_path):
    assert _run_refexp(refcoco, tmp_path / "out") == 0
    mix = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert {n: s["task"] for n, s in mix["sources"].items()} == {
        "ref_grounding": "ref_grounding", "grounded_caption": "grounded_caption"
    }  # fmt: skip
    assert all(s["box_format"] == "xyxy_1000" for s in mix["sources"].values())
