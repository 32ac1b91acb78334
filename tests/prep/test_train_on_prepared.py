"""End to end: what `python -m qwenvl_jax.prep` writes trains the tiny stage 1 and stage 2 configs
through `--config.data.mixture` and the shipped `configs/data/prepared_*.json`, with nothing in
between."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from paths import ROOT
from PIL import Image
from prep_pairs import write_tar
from tiny import train_config

from qwenvl_jax import train
from qwenvl_jax.prep import __main__ as prep_main

pytestmark = pytest.mark.slow

CAPTIONS = ["a dog on the grass", "a red car on a road", "two cats on a sofa",
            "a tall tower at night", "a bowl of fruit", "a boat on a lake"]  # fmt: skip


def _prep(argv):
    assert prep_main.main(argv) == 0, argv


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One directory laid out as configs/data/prepared_*.json expect, every part made by prep."""
    d = tmp_path_factory.mktemp("prepared")
    raw = d / "raw"
    raw.mkdir()
    # A.1 pairs: img2dataset-style shards (9-digit keys, as img2dataset names them).
    rows = [(f"{i:09d}", (256 + 8 * i, 240), c, 0.4, "kept") for i, c in enumerate(CAPTIONS)]
    rows.append(("000000099", (100, 100), "too small an image", 0.4, ""))
    write_tar(raw / "00000.tar", rows[:4])
    write_tar(raw / "00001.tar", rows[4:])
    _prep(["pairs", f"--input={raw}/*.tar", f"--output={d / 'laion_en'}", "--dataset=laion_en"])
    # COCO-style images for VQAv2 and RefCOCO.
    coco = d / "coco" / "train2014"
    coco.mkdir(parents=True)
    for i in range(3):
        name = f"COCO_train2014_{i:012d}.jpg"
        im = Image.new("RGB", (320, 240), (200, 200, 200))
        im.paste((220, 30, 30), (40 + 20 * i, 50, 160, 200))
        im.save(coco / name)
    qs = {
        "data_subtype": "train2014",
        "questions": [
            {"question_id": i, "image_id": i, "question": "What colour is the box?"}
            for i in range(3)
        ],
    }
    anns = {"annotations": [{"question_id": i, "image_id": i, "multiple_choice_answer": "red",
                             "answers": [{"answer": "red", "answer_confidence": "yes"}]}
                            for i in range(3)]}  # fmt: skip
    (raw / "q.json").write_text(json.dumps(qs))
    (raw / "a.json").write_text(json.dumps(anns))
    _prep(["vqav2", f"--input={raw / 'q.json'}", f"--annotations={raw / 'a.json'}",
           f"--image_root={d / 'coco'}", f"--output={d / 'vqav2'}"])  # fmt: skip
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 320, "height": 240}
              for i in range(3)]  # fmt: skip
    boxes = [{"id": i, "image_id": i, "bbox": [40 + 20 * i, 50, 120 - 20 * i, 150]}
             for i in range(3)]  # fmt: skip
    refs = [{"ref_id": i, "ann_id": i, "image_id": i, "split": "train",
             "sentences": [{"sent": "the red box"}]} for i in range(3)]  # fmt: skip
    (raw / "instances.json").write_text(json.dumps({"images": images, "annotations": boxes}))
    (raw / "refs.json").write_text(json.dumps(refs))
    _prep(["refexp", "--format=refcoco", f"--input={raw / 'refs.json'}",
           f"--instances={raw / 'instances.json'}", f"--image_root={coco}",
           f"--output={d / 'refcoco'}"])  # fmt: skip
    # GRIT as img2dataset writes it: the image and its metadata.
    grit_rows = []
    for i in range(3):
        grit_rows.append((f"{i:09d}", (300, 200), "a man next to a dog", None, "kept"))
    write_tar(raw / "grit.tar", grit_rows)
    _add_grit_metadata(raw / "grit.tar")
    _prep(["grit", f"--input={raw / 'grit.tar'}", f"--output={d / 'grit'}", "--spans=ref_exps"])
    # A.4 synthetic OCR pages (the OCR command), small ones.
    (raw / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 5)
    _prep(["synthdog", f"--input={raw / 'corpus.txt'}", f"--output={d / 'synthdog'}", "--pages=2",
           "--short_side=160,200", "--font_size=14,18"])  # fmt: skip
    for name in ("prepared_pretrain.json", "prepared_multitask.json"):
        shutil.copy(os.path.join(ROOT, "configs", "data", name), d / name)
    return d


def _add_grit_metadata(path):
    """Rewrites the tar's .json members with GRIT's fields (spans over "a man next to a dog")."""
    import io
    import tarfile

    members = []
    with tarfile.open(path) as t:
        for m in t.getmembers():
            data = t.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                spans = [[0, 5, 0.1, 0.1, 0.4, 0.9, 0.9], [0, 19, 0.1, 0.1, 0.9, 0.9, 0.8],
                         [14, 19, 0.5, 0.4, 0.9, 0.9, 0.9]]  # fmt: skip
                meta.update(caption="a man next to a dog", width=600, height=400, ref_exps=spans)
                data = json.dumps(meta).encode()
            members.append((m.name, data))
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _train(stage, mixture, workdir):
    c = train_config(stage, steps=2)
    # The published tokenizer's ids, and 64 adapter queries: a 63-byte image span holds the
    # prepared paths as prep writes them ("00000/000000001.png"); the :tiny 16 hold 15 bytes.
    c.model.overrides.vocab_size = 151936
    c.model.overrides.visual = {"n_queries": 64, "image_start_id": 151857}
    c.batch_size, c.grad_accum = 4, 1  # a few small steps: the point is that the data loads
    c.data.mixture = str(mixture)
    c.checkpoint.every_steps = 100
    return train.train(c, str(workdir), devices=jax.devices()[:1])


def test_pretrain_tiny_trains_on_prepared_pairs(prepared, tmp_path):
    report = json.loads((prepared / "laion_en" / "report.json").read_text())
    assert report["removed"]["min_size"] == 1 and report["records_out"] == len(CAPTIONS)
    hist = _train("pretrain", prepared / "prepared_pretrain.json", tmp_path / "w")
    assert len(hist) >= 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1].get("data/skipped", 0) == 0


def test_every_prepared_record_is_a_training_sample(prepared, tok):
    # Each source of the shipped stage-2 mixture, read by the trainer's own reader: every record
    # becomes a sample of its task (none skipped), its image found and decodable.
    from qwenvl_jax.data import images, pipeline, tasks
    from qwenvl_jax.train import inputs

    spec = inputs.load_mixture(str(prepared / "prepared_multitask.json"))
    srcs = pipeline.build_sources(pipeline.resolve_data_config(spec), tok)
    assert sorted(s.name for s in srcs) == sorted(TABLE3_TASKS)
    for src in srcs:
        assert len(src) >= 2, src.name
        for i in range(len(src)):
            ex = src[i]
            assert isinstance(ex, tasks.Example), (src.name, i, ex)
            for img in ex.images:
                images.decode_image(img, 8)


TABLE3_TASKS = ("caption", "vqa", "grounding", "ref_grounding", "grounded_caption", "ocr")


def test_multitask_tiny_trains_on_every_prepared_task(prepared, tmp_path):
    hist = _train("multitask", prepared / "prepared_multitask.json", tmp_path / "w")
    assert len(hist) >= 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1].get("data/skipped", 0) == 0
