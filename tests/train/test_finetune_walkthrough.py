"""The README's fine-tuning walk-through, end to end, on the tiny reference model.

A user's small official-format JSON (pictures of coloured shapes drawn here as PNGs; the answer is
the picture's colour) -> `convert import` of an HF checkpoint (the tiny model whose weights the
published code ran, tests/fixtures/reference/tiny.json) -> `python -m qwenvl_jax.train` with
configs/sft.py (full) and configs/sft.py:lora (with wte and lm_head trained, as the published
finetune.py does for the base model: the tiny model is random, not a chat model), as the README
writes them, only sizes changed by flags -> the held-out loss falls and both trained models answer
the training questions -> `convert export` (merged HF weights, and a PEFT adapter) -> the export
reloads to the trained params. The two trainings run as the command line runs them (subprocesses);
`convert import` / `export` run their `main` in this process.

That the published PyTorch code loads these exports (and `peft` the adapter) with the same logits
is checked by tools/check_walkthrough_export.py on the files this test keeps when
QWENVL_WALKTHROUGH_DIR is set; the tool writes its record (tests/fixtures/walkthrough/
torch_check.json) only when the check passes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from paths import ROOT
from PIL import Image, ImageDraw
from reference_weights import write_hf_dir

QUESTION = "What colour is the shape?"
COLOURS = {"red": (220, 30, 30), "green": (20, 170, 40), "blue": (30, 60, 230)}
TRAIN = [("circle", "red"), ("square", "green"), ("triangle", "blue")]
VAL = [("square", "red"), ("circle", "blue")]  # seen colours on other shapes
STEPS = 12
# The tiny model at the published architecture (256 queries per image: the published code's
# image span), one record per 320-token row; a high rate so that STEPS steps memorise it. Held-out
# loss at the middle and the end, one checkpoint (each costs seconds on a loaded CPU).
SIZES = [
    "--config.model.overrides.visual.n_queries=256", "--config.data.seq_len=320",
    "--config.batch_size=3", "--config.grad_accum=1", "--config.optim.warmup_steps=1",
    f"--config.steps={STEPS}", f"--config.eval.every_steps={STEPS // 2}", "--config.eval.batches=1",
    f"--config.log_every={STEPS // 2}", f"--config.checkpoint.every_steps={STEPS}",
]  # fmt: skip
# The published finetune.py's LoRA run of the base (non-chat) model: wte and lm_head trained too.
BASE_MODEL_LORA = r'--config.lora.modules_to_save=("^transformer\.wte\.", "^lm_head\.")'


def _draw(path, shape, colour):
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box, fill = (8, 8, 48, 48), COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(28, 6), (50, 50), (6, 50)], fill=fill)
    img.save(path)


def _write_json(root, name, items):
    records = []
    for shape, colour in items:
        img = f"img/{shape}_{colour}.png"
        _draw(os.path.join(root, img), shape, colour)
        user = f"Picture 1: <img>{img}</img>\n{QUESTION}"
        records.append(
            {
                "id": f"{shape}_{colour}",
                "conversations": [
                    {"from": "user", "value": user},
                    {"from": "assistant", "value": colour},
                ],
            }
        )
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def _run(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # not conftest's 8
    r = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert r.returncode == 0, " ".join(args) + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
    # One compile per run (a LoRA step whose state changed dtype after step 1 once compiled twice).
    assert "(expected once)" not in r.stdout + r.stderr, r.stderr[-3000:]
    return r.stdout


def _convert(*args):
    from qwenvl_jax.convert.__main__ import main as convert_main

    assert convert_main(list(args)) == 0, args


def _eval_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["eval/loss"] for r in rows if "eval/loss" in r]


def _answers(model, root):
    return [
        model.chat(
            f"Picture 1: <img>{root}/img/{shape}_{colour}.png</img>\n{QUESTION}",
            history=None,
            do_sample=False,
            max_new_tokens=4,
        )[0]
        for shape, colour in TRAIN
    ]


@pytest.mark.slow
def test_readme_finetune_walkthrough(tmp_path):
    from qwenvl_jax import QwenVL
    from qwenvl_jax.convert import hf_tensors
    from qwenvl_jax.convert.workdir import load_workdir_params

    root = os.environ.get("QWENVL_WALKTHROUGH_DIR") or str(tmp_path)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    train_json = _write_json(root, "train.json", TRAIN)
    val_json = _write_json(root, "val.json", VAL)
    hf_in = os.path.join(root, "Qwen-VL-Chat")
    os.makedirs(hf_in, exist_ok=True)
    write_hf_dir("tiny", hf_in)  # the user's downloaded HF checkpoint

    ckpt = os.path.join(root, "ckpt")
    _convert("import", hf_in, ckpt)
    common = [
        f"--config.init.checkpoint={ckpt}", f"--config.data.train={train_json}",
        f"--config.eval.data={val_json}", *SIZES,
    ]  # fmt: skip
    full, lora = os.path.join(root, "ft"), os.path.join(root, "lora")
    _run("qwenvl_jax.train", "--config=configs/sft.py:tiny", f"--workdir={full}", *common,
         "--config.optim.lr=3e-3")  # fmt: skip
    _run("qwenvl_jax.train", "--config=configs/sft.py:lora,tiny", f"--workdir={lora}", *common,
         "--config.optim.lr=2e-2", BASE_MODEL_LORA)  # fmt: skip
    for wd in (full, lora):
        losses = _eval_losses(wd)
        assert len(losses) == 2 and losses[-1] < 0.6 * losses[0], (wd, losses)

    out_full, out_lora = os.path.join(root, "out", "hf_full"), os.path.join(root, "out", "hf")
    out_adapter = os.path.join(root, "out", "adapter")
    _convert("export", full, out_full)
    _convert("export", lora, out_lora)
    _convert("export", lora, out_adapter, "--peft")
    assert sorted(os.listdir(out_adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out_adapter, "adapter_config.json")) as f:
        assert json.load(f)["modules_to_save"] == ["wte", "lm_head"]

    prompt = f"Picture 1: <img>{root}/img/circle_red.png</img>\n{QUESTION}"
    models = {n: QwenVL.from_pretrained(o, dtype="float32") for n, o in (("full", out_full),
              ("lora", out_lora), ("base", ckpt))}  # fmt: skip
    # The full export, as loaded, holds exactly the trained parameters.
    cfg, trained, _ = load_workdir_params(full)
    assert models["full"].config == cfg
    want = dict(hf_tensors(trained, cfg))
    del trained
    got = dict(hf_tensors(models["full"].model, cfg))
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    del got, want

    # Both fine-tuned models, loaded from their merged exports, answer the training questions;
    # the starting model does not.
    kept = {n: m.logits(prompt) for n, m in models.items()}
    kept["input_ids"] = models["full"].prepare(prompt)["input_ids"][0]
    if os.environ.get("QWENVL_WALKTHROUGH_DIR"):
        np.savez(os.path.join(root, "ours.npz"), **kept)
    assert _answers(models["full"], root) == [c for _, c in TRAIN]
    assert _answers(models["lora"], root) == [c for _, c in TRAIN]
    assert _answers(models["base"], root) != [c for _, c in TRAIN]  # they come from training
