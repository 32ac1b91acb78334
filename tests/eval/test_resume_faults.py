"""The evaluator's resume under a damaged predictions file (issue 24, item 5): unreadable lines
(damaged bytes, broken JSON, a line cut by a kill) and repeated questions are dropped with one
line naming them, their questions are asked again, and the scores equal an undisturbed run's.

The model is the tiny random HF checkpoint of the other evaluator tests
(`reference_weights.write_hf_dir`); the data are tests/fixtures/eval/data with small pictures.
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.eval import benchmarks, run

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "eval", "data")
GOOD = [{"question_id": i, "output": f"answer {i}"} for i in range(1, 6)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    shutil.copytree(FIXTURES, root / "data")
    rng = np.random.default_rng(0)
    for r in benchmarks.read_records("vqav2_val", str(root)):
        path = root / r["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(path)
    return str(root)


def _line(d) -> bytes:
    return json.dumps(d).encode() + b"\n"


def test_unreadable_and_repeated_lines_are_dropped_named_and_the_file_rewritten(tmp_path):
    path = tmp_path / "p.jsonl"
    damaged = bytearray(_line(GOOD[1]))
    damaged[5] = 0xFF  # a byte flipped on disk: no longer UTF-8
    path.write_bytes(
        _line(GOOD[0])
        + bytes(damaged)  # line 2
        + b'{"question_id": 3, "output": "ans\n'  # line 3: broken JSON
        + _line(GOOD[0] | {"output": "again"})  # line 4: question 1 a second time
        + b"[3]\n"  # line 5: JSON, but not a prediction
        + b'{"question_id": 6}\n'  # line 6: no output
        + _line(GOOD[3])  # line 7
        + _line(GOOD[4])[:-9]  # line 8: cut by a kill
    )
    logged = []
    done = run.read_predictions(str(path), logged.append)
    assert done == {"1": "answer 1", "4": "answer 4"}
    assert logged == [
        f"{path}: dropped 5 unreadable (lines 2, 3, 5, 6, 8) and 1 repeating a question (line 4)"
        " of its 8 lines; kept 2 predictions, the dropped questions are asked again"
    ]
    assert path.read_bytes() == _line(GOOD[0]) + _line(GOOD[3])
    assert not os.path.exists(str(path) + ".tmp")
    # The repaired file reads back clean: nothing more is dropped, nothing is said.
    logged.clear()
    assert run.read_predictions(str(path), logged.append) == done and logged == []


def test_an_intact_file_is_left_as_it_is(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(map(_line, GOOD)))
    before = os.stat(path)
    logged = []
    assert len(run.read_predictions(str(path), logged.append)) == 5 and logged == []
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns and os.stat(path).st_ino == before.st_ino


def test_a_resumed_damaged_run_asks_each_question_once_and_scores_as_an_undisturbed_one(
    hf_dir, data_dir, tmp_path
):
    kw = dict(batch_size=2, limit=4, dtype="float32", log=lambda s: None)
    clean = run.evaluate(hf_dir, "vqav2_val", data_dir, str(tmp_path / "clean"), **kw)
    clean_lines = (tmp_path / "clean" / "vqav2_val.jsonl").read_bytes().splitlines(keepends=True)
    assert len(clean_lines) == 4
    # The same run damaged on disk: line 2 flipped, line 1 written twice, the last line cut.
    out = tmp_path / "damaged"
    out.mkdir()
    flipped = clean_lines[1].replace(b'"output"', b'"outp\xffut"')
    damaged = [clean_lines[0], flipped, clean_lines[0], clean_lines[2], clean_lines[3][:-5]]
    (out / "vqav2_val.jsonl").write_bytes(b"".join(damaged))
    logged = []
    resumed = run.evaluate(hf_dir, "vqav2_val", data_dir, str(out), **(kw | {"log": logged.append}))
    assert logged[0] == (
        f"{out / 'vqav2_val.jsonl'}: dropped 2 unreadable (lines 2, 5) and 1 repeating a question"
        " (line 3) of its 5 lines; kept 2 predictions, the dropped questions are asked again"
    )
    assert logged[1] == f"vqav2_val: 4 questions, 2 already in {out / 'vqav2_val.jsonl'}"
    after = [json.loads(x) for x in (out / "vqav2_val.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in clean_lines]
    # Each question once: the 2 kept, then the 2 asked again, with the undisturbed run's outputs
    # (a random model's answers score 0 on vqav2, so the outputs are the discriminating check).
    assert after == [want[i] for i in (0, 2, 1, 3)]
    assert resumed["score"] == clean["score"] and resumed["n"] == clean["n"] == 4
    assert json.load(open(out / "vqav2_val_scores.json"))["score"] == clean["score"]
