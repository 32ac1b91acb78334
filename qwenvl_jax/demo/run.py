"""The out-of-the-box demo: Qwen-VL's three training stages on a synthetic world, on a CPU.

`python -m qwenvl_jax.demo` (and `python -m qwenvl_jax.train` without `--config`) calls `run_demo`,
which in `workdir`:

1. writes the synthetic dataset (`qwenvl_jax.demo.synthetic`) under `data/` unless it is there;
2. trains a SentencePiece vocabulary on its text (plus Qwen-VL's special tokens) into `tokenizer/`;
3. pre-trains the tiny visual tower (`stage0/`, `qwenvl_jax.demo.vision_pretrain`): the paper starts
   from a pre-trained ViT (OpenCLIP's), and this stands in for it;
4. runs the paper's stages with the real trainer (`qwenvl_jax.train.train`) on the tiny configs
   (`configs/{pretrain,multitask,sft}.py:tiny`), each initialised from the previous stage:
   `stage1/` ViT + adapter trained, decoder frozen, low resolution, captions and grounding pairs;
   `stage2/` everything trained at the higher resolution on the packed multi-task mix;
   `drill/` then `drill_ground/`: stage 3's config on single-turn "What colour is the <shape>?"
   questions alone, then on every object's referring phrase alone (the look-ups by name that the
   mixed stage 2 does not learn here);
   `stage3/` chat fine-tuning (multi-turn, two-picture questions) with the ViT frozen;
5. loads `stage3/` with `QwenVL.from_pretrained`, decodes the held-out questions greedily and writes
   `results.json`, `predictions.json`, `boxes.png` (true vs predicted boxes) and `loss.png`.

Re-running resumes: finished stages are skipped by the trainer (it restores the last checkpoint),
an interrupted stage continues from its last checkpoint (stage 0, minutes long and without
checkpoints, is rerun from its start). Settings: `quick` (CI, a minute or two), `default` (50
minutes on 2 CPU cores, measured), `long` (over two hours); docs/demo.md has the profile and the
measured numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from qwenvl_jax.demo import evaluate, synthetic, vision_pretrain
from qwenvl_jax.demo.vision_pretrain import PretrainSettings
from qwenvl_jax.demo.vocab import build_tokenizer
from qwenvl_jax.train import stage_config as stage_config_lib


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage of the demo.

    Attributes:
        name: the workdir subdirectory (stage1, stage2, drill, drill_ground, stage3).
        config: the config file in configs/ whose `tiny` variant it starts from.
        data: the synthetic file it trains on (stage1, stage2, drill, drill_ground, stage3).
        steps: optimizer steps.
        lr: peak learning rate (warm-up then cosine decay to lr / 10).
        image_size: the stage's resolution in pixels.
        seq_len: tokens per (packed) row; one image takes n_queries + 2.
        max_images: image slots per row.
        visual_lr: the peak LR of the visual tower (ViT and adapter, through `optim.lr_scale`);
            None: the stage's `lr`.
    """

    name: str
    config: str
    data: str
    steps: int
    lr: float
    image_size: int
    seq_len: int
    max_images: int
    visual_lr: float | None = None


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything that sizes a demo run.

    Attributes:
        n_train / n_heldout: pictures in the training and held-out splits.
        vocab_size: SentencePiece pieces (the tokenizer adds Qwen-VL's 217 special tokens).
        model: QWenConfig overrides of the tiny preset (decoder sizes; `visual` the ViT's).
        stages: the three stages.
        batch_size: sequences per optimizer step.
        eval_per_task: held-out records decoded per task (None: all).
        warmup_steps: linear warm-up of every stage.
        vision: stage 0 (pre-training of the visual tower); None starts stage 1 from a random init.
    """

    n_train: int
    n_heldout: int
    vocab_size: int
    model: dict
    stages: tuple[Stage, ...]
    batch_size: int = 8
    eval_per_task: int | None = None
    warmup_steps: int = 20
    vision: PretrainSettings | None = None


def _model(
    d: int, layers: int, vit_width: int = 64, vit_layers: int = 2, n_queries: int = 36
) -> dict:
    return {
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": d // 32,
        "kv_channels": 32,
        "intermediate_size": 4 * d,
        # The published initializer_range (0.02) is sized for d = 4096; at d = 128 it leaves the
        # attention logits ~20x smaller than a fan-in init and the decoder learned no look-ups
        # within 800 steps (measured: the same plateau with oracle picture features). ~1/sqrt(d).
        "initializer_range": 0.08,
        "visual": {
            "width": vit_width,
            "layers": vit_layers,
            "heads": vit_width // 16,
            "mlp_ratio": 2.0,
            "output_dim": d,
            "patch_size": 14,
            # Adapter queries = positions of an <img> span (the tokenizer is made to match): a
            # 6 x 6 grid of features summarises the 8 x 8 patches of a 112 px picture (the paper:
            # 16 x 16 for 32 x 32). Picture paths must then be at most 35 bytes (relative ones).
            "n_queries": n_queries,
        },
    }


# After stage 0 the visual tower learns at 2e-5 in every stage (the paper's stage-2 LR is 5e-5;
# the decoder here learns from scratch at 2e-3). At the decoder's LR, stage 2 undid what stage 0
# had taught: with the same stage-0 tower, 2,400 stage-2 steps gave VQA 0.46 and OCR 0.36 with
# the tower trained at 2e-3, and VQA 0.82 and OCR 0.89 with it frozen (measured, 2-core CPU).
VISUAL_LR = 2e-5


def _stages(
    s1: int, s2: int, drill: int, s3: int, lr: float = 2e-3, seq_len: int = 512
) -> tuple[Stage, ...]:
    """Stages 1 and 2, the two drills (`drill` steps each) and stage 3."""
    # A sample is 110-220 tokens (a 38-token picture, the ChatML frame, the turns), so a 512-token
    # row packs two to four of them.
    # Stage 1 trains only the visual tower (its decoder is frozen, and here a random one), so its
    # LR is VISUAL_LR. Without stage 0, at 2e-3 the ViT and adapter learned within 100 steps to
    # emit one constant feature for every picture (measured: the between-picture spread of the
    # adapter output fell from 18% to 0.03%).
    # Two drills (stage 3's config, single-turn samples) sit between stages 2 and 3: `drill`
    # asks every "What colour is the <shape>?" of every picture, `drill_ground` grounds every
    # object's referring phrase. In the mixed stage 2 the decoder never learned to look a shape
    # up by its name (in a dozen measured runs it answered the colour of the first object
    # listed; README, "The drills"); on these questions alone, at stage 3's LR, it learned that
    # within ~120 steps, and the mixture afterwards kept it. (At stage 2's 2e-3 for 200 steps it
    # did not, nor in one drill holding both tasks.)
    return (
        Stage("stage1", "pretrain.py", "stage1", s1, VISUAL_LR, 56, seq_len, 4),
        Stage("stage2", "multitask.py", "stage2", s2, lr, 112, seq_len, 4, VISUAL_LR),
        Stage("drill", "sft.py", "drill", drill, lr / 2, 112, seq_len, 4, VISUAL_LR),
        Stage("drill_ground", "sft.py", "drill_ground", drill, lr / 2, 112, seq_len, 4, VISUAL_LR),
        Stage("stage3", "sft.py", "stage3", s3, lr / 2, 112, seq_len, 4, VISUAL_LR),
    )


SETTINGS = {
    "quick": Setting(
        n_train=120,
        n_heldout=12,
        vocab_size=400,
        model=_model(64, 1, vit_width=32, vit_layers=1),
        stages=_stages(4, 8, 4, 4),
        batch_size=8,
        eval_per_task=3,
        warmup_steps=2,
        vision=PretrainSettings(steps=6, batch_size=8, n_eval=16, log_every=3),
    ),
    "default": Setting(
        n_train=3000,
        n_heldout=200,
        vocab_size=400,
        model=_model(128, 2),
        stages=_stages(100, 1500, 600, 200),
        batch_size=8,
        eval_per_task=100,
        vision=PretrainSettings(steps=4000),
    ),
    "long": Setting(
        n_train=10000,
        n_heldout=400,
        vocab_size=400,
        # Two decoder layers, as the default. Measured before the drill: four (0.71 vs 0.32
        # grounding on the default data) gave the long setting the same grounding (0.685 vs
        # 0.68) and lower VQA (0.665 vs 0.785) at 1.7x the time per stage-2 step (README,
        # "Decoder depth").
        model=_model(128, 2),
        stages=_stages(200, 5000, 600, 500),
        batch_size=8,
        eval_per_task=200,
        vision=PretrainSettings(steps=12000),
    ),
}

# Tokens generated per task at evaluation (the longest answer plus slack).
MAX_NEW_TOKENS = {"grounding": 48, "vqa": 8, "ocr": 8, "caption": 48}

# Seconds per unit of each phase measured on 2 CPU cores (docs/demo.md; a 512-token step takes
# 0.46 s since the blocked causal attention): they only weigh the phases of the progress line
# against each other, the ETA then follows the machine.
SECONDS_PER = {"picture": 0.002, "stage0": 0.12, "step": 0.46, "record": 0.03}


def stage_config(
    stage: Stage,
    setting: Setting,
    *,
    data_files: dict,
    tokenizer_dir: str,
    vocab_size: int,
    image_start_id: int,
    init_workdir: str,
    init_checkpoint: str = "",
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """The trainer config of one demo stage: the stage's `tiny` config plus the demo's sizes.

    The stage starts from `init_workdir` (a previous stage), else from `init_checkpoint` (stage
    0's), else from a random init.
    """
    from qwenvl_jax.data import pipeline

    c = stage_config_lib.load(f"{stage.config[:-3]}:tiny")
    model = json.loads(json.dumps(setting.model))
    model["vocab_size"] = vocab_size
    model["visual"]["image_start_id"] = image_start_id
    c.model.overrides = ml_collections.ConfigDict(model)
    c.seed = seed
    c.steps = stage.steps
    c.batch_size = setting.batch_size
    c.grad_accum = 1
    c.optim.lr = stage.lr
    c.optim.min_lr = stage.lr / 10
    c.optim.warmup_steps = min(setting.warmup_steps, max(stage.steps // 2, 1))
    if stage.visual_lr is not None and stage.visual_lr != stage.lr:
        frozen = set(c.optim.freeze)
        scales = {g: stage.visual_lr / stage.lr for g in ("vit", "adapter") if g not in frozen}
        if scales:
            c.optim.lr_scale = ml_collections.ConfigDict(scales)
    # One persistent compilation cache for every stage and every run of the demo: a program
    # compiled once (a resumed stage, a second run, the control) is loaded, not compiled again.
    c.compilation_cache_dir = compile_cache_dir()
    c.init.workdir = init_workdir
    c.init.checkpoint = "" if init_workdir else init_checkpoint
    c.init.allow_random = not (init_workdir or init_checkpoint)
    data = pipeline.default_data_config()
    data.sources[stage.data] = pipeline.source_config(
        kind="json", path=data_files[f"{stage.data}_train"], task="chatml"
    )
    c.data.kind = "pipeline"
    c.data.tokenizer = tokenizer_dir
    c.data.spec = data
    c.data.seq_len = stage.seq_len
    c.data.image_size = stage.image_size
    c.data.max_images = stage.max_images
    c.checkpoint.every_steps = max(stage.steps // 4, 1)
    c.checkpoint.keep = 2
    c.checkpoint.async_save = False
    c.log_every = max(1, min(10, stage.steps // 20))
    return c


def compile_cache_dir() -> str:
    """The demo's persistent XLA cache: $QWENVL_JAX_CACHE, else ~/.cache/qwenvl_jax/xla (XDG)."""
    if os.environ.get("QWENVL_JAX_CACHE"):
        return os.environ["QWENVL_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qwenvl_jax", "xla")


def chat_answer_fn(qwen, *, max_new_tokens: int = 48, batch_multiple: int = 1) -> evaluate.AnswerFn:
    """Batched greedy ChatML answers of a `QwenVL` (`chat.chat_batch`: `model.chat`'s responses,
    generated together) to `Picture k: <img>path</img>\n` + prompt; batches are padded to a
    multiple of `batch_multiple` (one compiled decode loop for every batch of a task)."""
    from qwenvl_jax import chat

    def answer(images: Sequence[Sequence[str]], prompts: Sequence[str]) -> list[str]:
        queries = [synthetic.picture(list(p)) + q for p, q in zip(images, prompts, strict=True)]
        return chat.chat_batch(
            qwen,
            queries,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            batch_multiple=batch_multiple,
        )

    return answer


def evaluate_workdir(
    model_dir: str,
    eval_file: str,
    out_dir: str,
    *,
    per_task: int | None = None,
    batch_size: int = 16,
    prior_from: Sequence[str] = (),
    progress: Callable[[str], None] | None = print,
    on_record: Callable[[int], None] | None = None,
) -> dict:
    """Greedy held-out evaluation of a trained workdir; writes predictions.json and boxes.png.

    Args:
      batch_size: records decoded together; every batch of a task is padded to the same size,
        so a task compiles one decode loop (the answers do not depend on it: 16 and 100 gave the
        same 400 predictions).
      prior_from: training JSON files; when given, the metrics also hold "blind_prior", the
        scores of `evaluate.prior_predictions` (answers chosen without looking at the picture).
      on_record: called with the number of records answered so far (a progress display).

    Returns:
      the metrics of `evaluate.score`.
    """
    from qwenvl_jax.api import QwenVL

    image_root = os.path.dirname(os.path.abspath(eval_file))
    qwen = QwenVL.from_pretrained(os.path.abspath(model_dir), image_root=image_root)
    records = evaluate.load_records(eval_file, per_task=per_task)
    predictions: list[str | None] = [None] * len(records)
    answered = 0
    for task in synthetic.EVAL_TASKS:
        idx = [i for i, r in enumerate(records) if r["task"] == task]
        if not idx:
            continue
        batch = min(batch_size, len(idx))
        fn = chat_answer_fn(qwen, max_new_tokens=MAX_NEW_TOKENS[task], batch_multiple=batch)
        for start in range(0, len(idx), batch):
            chunk = idx[start : start + batch]
            got = fn([records[i]["images"] for i in chunk], [records[i]["prompt"] for i in chunk])
            for i, g in zip(chunk, got, strict=True):
                predictions[i] = g
            answered += len(chunk)
            if progress is not None:
                progress(f"  eval {task}: {min(start + batch, len(idx))}/{len(idx)}")
            if on_record is not None:
                on_record(answered)
    metrics = evaluate.score(records, predictions)
    if prior_from:
        prior = evaluate.score(records, evaluate.prior_predictions(prior_from, records))
        metrics["blind_prior"] = {k: v for k, v in prior.items() if not k.startswith("n_")}
    evaluate.save_json(
        os.path.join(out_dir, "predictions.json"),
        [dict(r, prediction=p) for r, p in zip(records, predictions, strict=True)],
    )
    evaluate.plot_boxes(
        records, predictions, os.path.join(out_dir, "boxes.png"), image_root=image_root
    )
    return metrics


def run_demo(
    workdir: str,
    *,
    quick: bool = False,
    setting: str | None = None,
    shuffle_labels: bool = False,
    seed: int = 0,
    skip_eval: bool = False,
    progress: Callable[[str], None] = print,
    progress_line: bool = True,
) -> dict[str, Any]:
    """Runs the demo in `workdir` (see the module docstring) and returns its results.

    Args:
        workdir: output directory (created; re-running resumes).
        quick: the CI setting (same as setting="quick").
        setting: "quick", "default" or "long" (default: "quick" if quick else "default").
        shuffle_labels: train on permuted answers (the chance-level control).
        seed: the data, initialisation and shuffling seed.
        skip_eval: train only.
        progress: receives progress lines.
        progress_line: draw the run's one progress line (stage, step, ETA) on stderr: in place on
            a terminal, a plain line every 30 s otherwise (`qwenvl_jax.demo.progress`).

    Returns:
        {"setting", "metrics" (evaluate.score's dict; absent with skip_eval), "seconds" per phase,
         "workdirs" per stage, "files"}.
    """
    name = setting or ("quick" if quick else "default")
    if name not in SETTINGS:
        raise KeyError(f"unknown demo setting {name!r}; choose from {sorted(SETTINGS)}")
    cfg = SETTINGS[name]
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    line = _progress_line(cfg, skip_eval) if progress_line else None
    try:
        from qwenvl_jax import train as train_lib

        def enter(phase: str):
            if line is not None:
                line.start(phase)

        def step(done: int, _total: int = 0):
            if line is not None:
                line.update(done)

        def finish(phase: str):
            if line is not None:
                line.finish(phase)

        enter("data")

        progress(f"[demo] setting {name!r} in {workdir}")
        progress(
            f"[demo] 1/5 synthetic data: {cfg.n_train} training, {cfg.n_heldout} held-out pictures"
        )
        manifest = synthetic.generate(
            os.path.join(workdir, "data"),
            n_train=cfg.n_train,
            n_heldout=cfg.n_heldout,
            seed=seed,
            shuffle_labels=shuffle_labels,
        )
        times["data"] = time.time() - t0
        finish("data")

        t = time.time()
        tok_dir = os.path.join(workdir, "tokenizer")
        tok = build_tokenizer(
            manifest["files"]["corpus"], tok_dir, cfg.vocab_size, cfg.model["visual"]["n_queries"]
        )
        vocab = -(-tok.n_vocab // 64) * 64
        progress(f"[demo] 2/5 SentencePiece vocabulary: {tok.n_vocab} tokens (model vocab {vocab})")
        times["tokenizer"] = time.time() - t

        stage_dirs: dict[str, str] = {}
        curves: dict[str, list] = {}
        vision_ckpt = ""
        vision_metrics: dict = {}
        if cfg.vision is not None:
            t = time.time()
            enter("stage0")
            vision_ckpt = os.path.join(workdir, "stage0")
            progress(
                f"[demo] 3/5 stage0 (the visual tower learns what is where in"
                f" {cfg.vision.steps} steps of {cfg.vision.batch_size} fresh pictures; the decoder"
                " keeps its random init)"
            )
            c = stage_config(
                cfg.stages[1],
                cfg,
                data_files=manifest["files"],
                tokenizer_dir=tok_dir,
                vocab_size=vocab,
                image_start_id=tok.img_start_id,
                init_workdir="",
                seed=seed,
            )
            done = vision_pretrain.pretrain_visual(
                train_lib.model_config(c),
                vision_ckpt,
                cfg.vision,
                seed=seed,
                progress=progress,
                on_step=step,
            )
            finish("stage0")
            # Not in loss.png: its loss (two CEs and an L1 per token) is not the stages' LM loss.
            vision_metrics = done["metrics"]
            stage_dirs["stage0"] = vision_ckpt
            times["stage0"] = time.time() - t
        previous = ""
        for stage in cfg.stages:
            t = time.time()
            sdir = os.path.join(workdir, stage.name)
            c = stage_config(
                stage,
                cfg,
                data_files=manifest["files"],
                tokenizer_dir=tok_dir,
                vocab_size=vocab,
                image_start_id=tok.img_start_id,
                init_workdir=previous,
                init_checkpoint=vision_ckpt,
                seed=seed,
            )
            progress(
                f"[demo] 3/5 {stage.name} ({stage.config}:tiny, {stage.steps} steps,"
                f" {stage.image_size} px, seq {stage.seq_len}, frozen {tuple(c.optim.freeze)})"
            )
            enter(stage.name)
            train_lib.train(c, sdir, on_step=step)
            finish(stage.name)
            # The tokenizer travels with every stage so that from_pretrained(stage dir) finds it.
            _copy_tokenizer(tok_dir, sdir)
            curves[stage.name] = evaluate.read_metrics(sdir)
            stage_dirs[stage.name] = sdir
            previous = sdir
            times[stage.name] = time.time() - t
            if curves[stage.name]:
                first, last = curves[stage.name][0][1], curves[stage.name][-1][1]
                progress(
                    f"[demo] {stage.name} done in {times[stage.name]:.0f}s:"
                    f" loss {first:.3f} -> {last:.3f}"
                )

        files = {"loss": evaluate.plot_loss_curves(curves, os.path.join(workdir, "loss.png"))}
        result: dict[str, Any] = {"setting": name, "workdirs": stage_dirs, "seconds": times}
        if vision_metrics:
            result["stage0_held_aside"] = vision_metrics
        if not skip_eval:
            t = time.time()
            progress("[demo] 4/5 held-out evaluation (greedy decoding)")
            enter("eval")
            metrics = evaluate_workdir(
                previous,
                manifest["files"]["eval"],
                workdir,
                per_task=cfg.eval_per_task,
                prior_from=[manifest["files"][f"{s.data}_train"] for s in cfg.stages],
                progress=progress,
                on_record=step,
            )
            finish("eval")
            times["eval"] = time.time() - t
            files["boxes"] = os.path.join(workdir, "boxes.png")
            files["predictions"] = os.path.join(workdir, "predictions.json")
            result["metrics"] = metrics
            table = evaluate.format_table(
                metrics, title=f"held-out evaluation ({name})", baseline=metrics.get("blind_prior")
            )
            progress(
                table + "\n(blind prior: the most frequent training answer to the same prompt)"
            )
        times["total"] = time.time() - t0
        result["files"] = files
        result["shuffle_labels"] = shuffle_labels
        result["machine"] = _machine()
        evaluate.save_json(os.path.join(workdir, "results.json"), result)
        progress(
            f"[demo] 5/5 done in {times['total']:.0f}s; results.json, loss.png, boxes.png"
            f" in {workdir}"
        )
        return result
    finally:
        if line is not None:
            line.close()


def _progress_line(cfg: Setting, skip_eval: bool):
    """The run's phases, weighted by their expected seconds (docs/demo.md's profile)."""
    from qwenvl_jax.demo.progress import Phase, Progress

    n_eval = (cfg.eval_per_task or cfg.n_heldout) * len(synthetic.EVAL_TASKS)
    phases = [Phase("data", cfg.n_train, SECONDS_PER["picture"] * cfg.n_train)]
    if cfg.vision is not None:
        phases.append(Phase("stage0", cfg.vision.steps, SECONDS_PER["stage0"] * cfg.vision.steps))
    for st in cfg.stages:
        per = SECONDS_PER["step"] * (st.seq_len / 512) * cfg.batch_size / 8
        phases.append(Phase(st.name, st.steps, per * st.steps))
    if not skip_eval:
        phases.append(Phase("eval", n_eval, SECONDS_PER["record"] * n_eval))
    return Progress(phases)


def _machine() -> str:
    import platform

    import jax

    dev = jax.devices()[0]
    return (
        f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}),"
        f" jax {jax.__version__} on {dev.platform} ({dev.device_kind})"
    )


def _copy_tokenizer(src: str, dst: str) -> None:
    import shutil

    for f in os.listdir(src):
        if f.endswith((".model", ".vocab")):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
