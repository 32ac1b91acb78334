"""Stage 0 of the demo: pre-train the tiny visual tower, as the paper starts from a pre-trained ViT.

Qwen-VL never trains its ViT from scratch: stage 1 starts from OpenCLIP's ViT-bigG, which already
sees objects and reads text. The demo's tiny ViT has no such checkpoint, and trained from a random
init only through the frozen-then-trained decoder it stayed near chance at reading words and at
telling shapes apart (README, "Where grounding fails"). Stage 0 gives it the kind of start the
paper's ViT has: the visual tower (ViT, adapter, `ln_post`, `proj`) learns, with a linear head
that is thrown away afterwards, to say for each of its n_queries output tokens what lies at that
token's place in the picture:

- what is there: nothing, a word, or which colour and shape (cross-entropy);
- which word, where a word is (cross-entropy);
- the box of the object there, in [0, 1] (L1).

The pictures come from `synthetic.make_scene` on a random stream of their own (neither the training
nor the held-out split), rendered and preprocessed as the data pipeline does. The decoder is not
touched; the result is saved as a full checkpoint (`convert.ours` format: `config.json`,
`params/`) that stage 1 initialises from (`config.init.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwenvl_jax import image
from qwenvl_jax.config import QWenConfig
from qwenvl_jax.demo import synthetic

COLOURS = tuple(synthetic.COLOURS)
N_CLASSES = 2 + len(synthetic.SHAPES) * len(COLOURS)  # nothing, word, shape x colour
N_WORDS = len(synthetic.WORDS)
BOX_WEIGHT = 10.0  # the L1 box loss (in units of the picture side) next to the two CEs
METRICS_FILE = "stage0_metrics.json"


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """How stage 0 trains.

    Attributes:
        steps: Adam steps.
        batch_size: pictures per step.
        lr: peak learning rate (warm-up, then cosine decay to lr / 10).
        n_eval: held-aside pictures scored at every log line.
        log_every: steps between log lines.
    """

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    n_eval: int = 256
    log_every: int = 500


def class_id(obj: synthetic.Obj) -> int:
    """1 for a word, 2 + shape * len(COLOURS) + colour for a shape (0 is 'nothing')."""
    if obj.kind == "word":
        return 1
    return 2 + synthetic.SHAPES.index(obj.kind) * len(COLOURS) + COLOURS.index(obj.colour)


def token_targets(scene: synthetic.Scene, grid: int) -> tuple[np.ndarray, ...]:
    """Per-token targets of a scene for a `grid` x `grid` layout of output tokens (row-major).

    A token stands for the point at the centre of its cell; its targets describe the object whose
    box holds that point.

    Returns:
        (cls [G*G] int32, word [G*G] int32 (-1 where no word), box [G*G, 4] float32 in [0, 1]
        (zeros where nothing)).
    """
    n = grid * grid
    cls = np.zeros(n, np.int32)
    word = np.full(n, -1, np.int32)
    box = np.zeros((n, 4), np.float32)
    centres = (np.arange(grid) + 0.5) * scene.size / grid
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        for r in np.flatnonzero((centres >= y1) & (centres < y2)):
            for c in np.flatnonzero((centres >= x1) & (centres < x2)):
                t = r * grid + c
                cls[t] = class_id(obj)
                if obj.kind == "word":
                    word[t] = synthetic.WORDS.index(obj.text)
                box[t] = np.asarray(obj.box, np.float32) / scene.size
    return cls, word, box


def make_batch(
    rng: np.random.Generator, n: int, grid: int, image_size: int, world: synthetic.WorldConfig
) -> dict[str, np.ndarray]:
    """n random pictures (preprocessed, [n, S, S, 3]) with their per-token targets."""
    pics, cls, word, box = [], [], [], []
    for _ in range(n):
        scene = synthetic.make_scene(rng, world)
        pics.append(image.preprocess(synthetic.render(scene), image_size))
        c, w, b = token_targets(scene, grid)
        cls.append(c)
        word.append(w)
        box.append(b)
    return {
        "images": np.stack(pics),
        "cls": np.stack(cls),
        "word": np.stack(word),
        "box": np.stack(box),
    }


class _Pretrainer(nnx.Module):
    """The visual tower plus the linear per-token head (discarded after stage 0)."""

    def __init__(self, visual: nnx.Module, dim: int, *, rngs: nnx.Rngs):
        self.visual = visual
        self.head = nnx.Linear(dim, N_CLASSES + N_WORDS + 4, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        out = self.head(self.visual(images))  # [B, Q, C]
        return (
            out[..., :N_CLASSES],
            out[..., N_CLASSES : N_CLASSES + N_WORDS],
            out[..., N_CLASSES + N_WORDS :],
        )


def _losses(m: _Pretrainer, batch: dict) -> tuple[jax.Array, dict]:
    cls_logits, word_logits, box = m(batch["images"])
    cls_loss = optax.softmax_cross_entropy_with_integer_labels(cls_logits, batch["cls"]).mean()
    has_word = batch["word"] >= 0
    word_ce = optax.softmax_cross_entropy_with_integer_labels(
        word_logits, jnp.maximum(batch["word"], 0)
    )
    word_loss = (word_ce * has_word).sum() / jnp.maximum(has_word.sum(), 1)
    on_obj = (batch["cls"] > 0)[..., None]
    box_l1 = (jnp.abs(box - batch["box"]) * on_obj).sum() / jnp.maximum(on_obj.sum() * 4, 1)
    total = cls_loss + word_loss + BOX_WEIGHT * box_l1
    return total, {"cls_loss": cls_loss, "word_loss": word_loss, "box_l1": box_l1}


@nnx.jit
def _train_step(m: _Pretrainer, opt: nnx.Optimizer, batch: dict) -> tuple[jax.Array, dict]:
    (loss, parts), grads = nnx.value_and_grad(_losses, has_aux=True)(m, batch)
    opt.update(m, grads)
    return loss, parts


@nnx.jit
def _predict(m: _Pretrainer, images: jax.Array):
    return m(images)


def score(m: _Pretrainer, batch: dict, image_size: int) -> dict[str, float]:
    """Per-token accuracies on `batch`: `object` (class of tokens on an object), `shape` (its shape
    alone), `colour`, `word` (on word tokens), `empty` (tokens on nothing), `box_px` (mean L1 of
    the box corners in pixels, on object tokens)."""
    cls_logits, word_logits, box = (np.asarray(x) for x in _predict(m, batch["images"]))
    cls, word = batch["cls"], batch["word"]
    pred = cls_logits.argmax(-1)
    obj, shape = cls > 0, cls >= 2
    n_col = len(COLOURS)
    return {
        "object": float((pred[obj] == cls[obj]).mean()),
        "shape": float(((pred[shape] - 2) // n_col == (cls[shape] - 2) // n_col).mean()),
        "colour": float(((pred[shape] - 2) % n_col == (cls[shape] - 2) % n_col).mean()),
        "word": float((word_logits.argmax(-1)[word >= 0] == word[word >= 0]).mean()),
        "empty": float((pred[~obj] == 0).mean()),
        "box_px": float(np.abs(box - batch["box"])[obj].mean() * image_size),
    }


def pretrain_visual(
    mcfg: QWenConfig,
    out_dir: str,
    settings: PretrainSettings,
    *,
    seed: int = 0,
    world: synthetic.WorldConfig | None = None,
    progress: Callable[[str], None] | None = print,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Runs stage 0 into `out_dir` (a `convert.ours` checkpoint of the whole model) unless done.

    The decoder keeps its random init (the seed's). The checkpoint is written to a temporary
    directory and renamed into place, so `out_dir` either holds a finished stage 0 or nothing;
    an unfinished earlier run (no checkpoint) is run again from its start, which is said.

    Args:
        mcfg: the model config of the later stages: the visual tower's sizes and the resolution
            stage 0 trains at (`visual.image_size`).
        out_dir: where the checkpoint and `stage0_metrics.json` go.
        settings: steps, batch, LR, evaluation and logging (the resolution is the config's).
        seed: initialisation and picture stream seed.
        world: the synthetic layout of the pictures (default: `synthetic.WorldConfig()`).
        progress: receives log lines (None: silent).
        on_step: called with (step, steps) after each step is dispatched (a progress display).

    Returns:
        {"steps", "seconds", "metrics" (`score` on the held-aside pictures), "curve" [(step,
        loss)]}; read back from `out_dir` when stage 0 was already done.

    Raises:
        ValueError: when the adapter's n_queries is not a square number.
    """
    from qwenvl_jax.convert import ours
    from qwenvl_jax.model.factory import make_model
    from qwenvl_jax.model.options import ModelOptions

    say = progress or (lambda _: None)
    world = world or synthetic.WorldConfig()
    out_dir = os.path.abspath(out_dir)
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    if ours.is_ours(out_dir) and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            done = json.load(f)
        say(f"  stage0 already done in {out_dir} ({done['steps']} steps); reusing it")
        return done
    if os.path.exists(out_dir):
        say(f"  stage0: {out_dir} holds no finished checkpoint; running stage 0 from its start")
    size = mcfg.visual.image_size
    grid = math.isqrt(mcfg.visual.n_queries)
    if grid * grid != mcfg.visual.n_queries:
        raise ValueError(f"stage 0 needs a square number of adapter queries, got {mcfg.visual}")

    t0 = time.time()
    model = make_model(mcfg, ModelOptions(), nnx.Rngs(seed))
    m = _Pretrainer(model.transformer.visual, mcfg.visual.output_dim, rngs=nnx.Rngs(seed + 1))
    warmup = min(50, max(settings.steps // 2, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, warmup, max(settings.steps, warmup + 1), settings.lr / 10
    )
    opt = nnx.Optimizer(m, optax.adamw(schedule), wrt=nnx.Param)
    # Streams of their own: [seed, 90] for training pictures, [seed, 91] for the scored ones.
    rng = np.random.default_rng([seed, 90])
    held = make_batch(np.random.default_rng([seed, 91]), settings.n_eval, grid, size, world)
    curve: list[list] = []
    metrics: dict[str, float] = {}
    for step in range(1, settings.steps + 1):
        batch = make_batch(rng, settings.batch_size, grid, size, world)
        loss, _ = _train_step(m, opt, batch)
        if on_step is not None:
            on_step(step, settings.steps)
        if step == 1 or step % settings.log_every == 0 or step == settings.steps:
            curve.append([step, float(loss)])
            metrics = score(m, held, size)
            say(
                f"  stage0 step {step}/{settings.steps} | loss {float(loss):.3f} | held-aside "
                + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                + f" | [{time.time() - t0:.0f}s]"
            )
    result = {
        "steps": settings.steps,
        "seconds": time.time() - t0,
        "metrics": metrics,
        "curve": curve,
        "settings": dataclasses.asdict(settings),
    }
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    ours.save_params(tmp, nnx.state(model, nnx.Param), mcfg)
    with open(os.path.join(tmp, METRICS_FILE), "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return result
