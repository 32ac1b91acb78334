"""The demo end to end on the quick setting: the stages learn, resume exactly, and chat."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.demo import evaluate
from qwenvl_jax.demo import run as demo


def test_stage_configs_follow_the_paper(tmp_path):
    # Which towers each stage freezes, what it starts from and its resolution (Qwen-VL section 3).
    setting = demo.SETTINGS["quick"]
    names = ["stage1", "stage2", "drill", "drill_ground", "stage3"]
    assert [st.name for st in setting.stages] == names
    files = {f"{n}_train": f"/d/{n}_train.json" for n in names}
    cfgs = [
        demo.stage_config(
            st,
            setting,
            data_files=files,
            tokenizer_dir="/tok",
            vocab_size=640,
            image_start_id=614,
            init_workdir=f"/w/{names[k - 1]}" if k else "",
        )
        for k, st in enumerate(setting.stages)
    ]
    assert "llm" in cfgs[0].optim.freeze and "vit" not in cfgs[0].optim.freeze
    assert "llm" not in cfgs[1].optim.freeze and "vit" not in cfgs[1].optim.freeze
    for c in cfgs[2:]:  # the drills and stage 3
        assert "vit" in c.optim.freeze and "llm" not in c.optim.freeze
    assert cfgs[0].init.allow_random and not cfgs[0].init.workdir
    # With stage 0 (the pre-trained visual tower), stage 1 starts from its checkpoint instead.
    from_stage0 = demo.stage_config(
        setting.stages[0], setting, data_files=files, tokenizer_dir="/tok", vocab_size=640,
        image_start_id=614, init_workdir="", init_checkpoint="/w/stage0",
    )  # fmt: skip
    assert from_stage0.init.checkpoint == "/w/stage0" and not from_stage0.init.allow_random
    assert all(not c.init.checkpoint for c in cfgs)
    assert [c.init.workdir for c in cfgs[1:]] == [f"/w/{n}" for n in names[:-1]]
    assert cfgs[0].data.image_size < cfgs[1].data.image_size == cfgs[3].data.image_size
    for n, c in zip(names, cfgs, strict=True):
        assert c.data.kind == "pipeline" and c.data.tokenizer == "/tok"
        assert c.data.spec.sources[n].path == f"/d/{n}_train.json"
        assert c.model.overrides.visual.n_queries == setting.model["visual"]["n_queries"]
        assert c.model.overrides.visual.image_start_id == 614
        # A row packs several samples, each at most ~230 tokens with one 38-token image span.
        assert c.data.seq_len >= 2 * 230 and c.data.max_images >= 2


@pytest.mark.slow
def test_quick_demo_learns_and_writes_outputs(quick_run):
    workdir, result = quick_run
    assert result["workdirs"]["stage0"] == os.path.join(workdir, "stage0")
    assert set(result["stage0_held_aside"]) >= {"object", "shape", "colour", "word", "box_px"}
    for stage in demo.SETTINGS["quick"].stages:
        losses = [v for _, v in evaluate.read_metrics(os.path.join(workdir, stage.name))]
        assert len(losses) == stage.steps
        assert np.all(np.isfinite(losses))
    # Stage 2 trains everything: its loss must fall well below the first steps'.
    s2 = [v for _, v in evaluate.read_metrics(os.path.join(workdir, "stage2"))]
    assert np.mean(s2[-2:]) < np.mean(s2[:2]) - 0.2, s2
    m = result["metrics"]
    for key in ("grounding_acc", "vqa_acc", "ocr_em", "caption_em", "caption_cider"):
        assert 0.0 <= m[key] <= (10.0 if key == "caption_cider" else 1.0)
    assert set(m["blind_prior"]) >= {"grounding_acc", "vqa_acc", "ocr_em", "caption_cider"}
    for name in ("loss.png", "boxes.png"):
        with Image.open(os.path.join(workdir, name)) as im:
            assert im.size[0] >= 300 and im.size[1] >= 200
    with open(os.path.join(workdir, "predictions.json")) as f:
        preds = json.load(f)
    assert len(preds) == sum(m[f"n_{t}"] for t in ("grounding", "vqa", "ocr", "caption"))
    assert all(isinstance(p["prediction"], str) for p in preds)


@pytest.mark.slow
def test_resumed_stage_continues_exactly(quick_run, tmp_path):
    # Re-run stage 2 of the quick demo in a new workdir, interrupted after 3 steps and restarted;
    # the losses must equal the uninterrupted run's (same config, data order and initialisation).
    from qwenvl_jax import tokenizer as tok_lib
    from qwenvl_jax import train as train_lib

    workdir, _ = quick_run
    setting = demo.SETTINGS["quick"]
    with open(os.path.join(workdir, "data", "manifest.json")) as f:
        files = json.load(f)["files"]
    tok = tok_lib.load_tokenizer(
        os.path.join(workdir, "tokenizer"), image_span=setting.model["visual"]["n_queries"]
    )
    cfg = demo.stage_config(
        setting.stages[1],
        setting,
        data_files=files,
        tokenizer_dir=os.path.join(workdir, "tokenizer"),
        vocab_size=-(-tok.n_vocab // 64) * 64,
        image_start_id=tok.img_start_id,
        init_workdir=os.path.join(workdir, "stage1"),
    )
    out = str(tmp_path / "stage2")
    first = train_lib.train(cfg, out, stop_after=3)
    second = train_lib.train(cfg, out)
    got = {r["step"]: r["loss"] for r in first + second}
    want = dict(evaluate.read_metrics(os.path.join(workdir, "stage2")))
    assert sorted(got) == sorted(want)
    # Same program on the same CPU and the same restored state: equal up to float32 rounding.
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                               rtol=1e-6)  # fmt: skip


@pytest.mark.slow
def test_trained_workdir_chats(quick_run):
    from qwenvl_jax import QwenVL

    workdir, _ = quick_run
    # Picture paths in the data are relative to the data directory.
    qwen = QwenVL.from_pretrained(
        os.path.join(workdir, "stage3"), image_root=os.path.join(workdir, "data")
    )
    with open(os.path.join(workdir, "data", "eval.json")) as f:
        records = json.load(f)[:3]
    query = f"Picture 1: <img>{records[0]['images'][0]}</img>\n{records[0]['prompt']}"
    response, history = qwen.chat(query, max_new_tokens=24)
    assert isinstance(response, str) and history == [(query, response)]
    # The evaluation's batched decoding answers exactly as model.chat does, row by row.
    batched = demo.chat_answer_fn(qwen, max_new_tokens=24)(
        [r["images"] for r in records], [r["prompt"] for r in records]
    )
    for r, b in zip(records, batched, strict=True):
        q = f"Picture 1: <img>{r['images'][0]}</img>\n{r['prompt']}"
        assert qwen.chat(q, max_new_tokens=24)[0] == b
