"""Held-out evaluation of a chat model on the synthetic world (or any records of the same form).

Records are dicts with `task` (grounding | vqa | ocr | caption), `images` (paths), `prompt` (the
user text after the `Picture k: <img>…</img>\\n` prefixes), `answer` (the reference) and, for
grounding, `box` ([x1, y1, x2, y2] in [0, 1000)). `qwenvl_jax.demo.synthetic` writes them to
`eval.json`.

Decoding is greedy. The prompts are the official `eval_mm/` prompts in chat form, and the metrics
are theirs:

- grounding: the first `(x1,y1),(x2,y2)` of the answer (no box parses as (0, 0, 0, 0), as the
  official script does) counts when IoU >= 0.5 with the true box ("Precision @ 1"). IoU is computed
  in the [0, 1000) grid; the official division by 999 and scaling by the image size cancel in IoU.
- vqa: exact match after lower-casing and stripping punctuation and articles.
- ocr: exact match of the stripped text.
- caption: exact match, and CIDEr-D (`cider_d`, the pycocoevalcap formula: n-grams 1..4 with
  tf-idf from the references, clipped counts, a Gaussian length penalty with sigma 6, times 10).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from qwenvl_jax import grounding
from qwenvl_jax import image as image_lib
from qwenvl_jax.demo import synthetic

AnswerFn = Callable[[Sequence[Sequence[str]], Sequence[str]], list[str]]
"""(images per query, prompt per query) -> one response per query."""

_ARTICLES = {"a", "an", "the"}


# ----------------------------------------------------------------------------------- metrics
def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for empty boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def centre_inside(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether box a is non-empty and its centre lies in box b (the "pointing game" hit)."""
    if not (a[2] > a[0] and a[3] > a[1]):
        return False
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    return b[0] <= cx <= b[2] and b[1] <= cy <= b[3]


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (VQA-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str], n: int) -> collections.Counter:
    return collections.Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, np.ndarray]:
    """CIDEr-D of candidates against their reference sets (the pycocoevalcap `Cider` formula).

    Document frequencies come from the references of all items; each n-gram weighs
    tf * (log(#items) - log(max(1, df))). Per n, the score is the clipped cosine
    sum(min(c, r) * r) / (|c| |r|) times exp(-delta^2 / (2 sigma^2)), where delta is the difference
    of the numbers of bigrams (the published code's length); averaged over n and references, x 10.

    Args:
      candidates: one string per item.
      references: per item, one or more reference strings.
      n: largest n-gram order.
      sigma: the length penalty's width.

    Returns:
      (mean score, per-item scores float64 [items]).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not candidates:
        return 0.0, np.zeros(0)
    refs = [[_ngrams(_tokens(r), n) for r in rs] for rs in references]
    cands = [_ngrams(_tokens(c), n) for c in candidates]
    df = collections.Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_n = math.log(float(len(refs)))

    def vec(counts):
        v = [dict() for _ in range(n)]
        norm = np.zeros(n)
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, np.sqrt(norm), length

    scores = np.zeros(len(cands))
    for i, (c, rs) in enumerate(zip(cands, refs, strict=True)):
        vc, nc, lc = vec(c)
        total = np.zeros(n)
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lc - lr)
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores[i] = total.mean() / len(rs) * 10.0
    return float(scores.mean()), scores


def score(records: Sequence[dict], predictions: Sequence[str]) -> dict:
    """Metrics of predictions against their records.

    Returns:
      {"grounding_acc", "vqa_acc", "ocr_em", "caption_em", "caption_cider", "n_<task>"} for the
      tasks present, plus "mean_iou" and "grounding_point_acc" (the predicted box's centre lies in
      the true box: the object was found, however loose the box).
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    by_task: dict[str, list[tuple[dict, str]]] = collections.defaultdict(list)
    for r, p in zip(records, predictions, strict=True):
        if r.get("task") not in synthetic.EVAL_TASKS:
            raise ValueError(f"eval record {r.get('id')!r}: unknown task {r.get('task')!r}")
        by_task[r["task"]].append((r, p))
    out: dict[str, float] = {}
    if "grounding" in by_task:
        ious, points = [], []
        for r, p in by_task["grounding"]:
            box = r.get("box")
            if not (isinstance(box, list) and len(box) == 4):
                raise ValueError(
                    f"eval record {r.get('id')!r}: 'box' must be 4 numbers, got {box!r}"
                )
            pred = grounding.first_box(p)
            ious.append(iou(pred, box))
            points.append(centre_inside(pred, box))
        out["grounding_acc"] = float(np.mean(np.asarray(ious) >= 0.5))
        out["mean_iou"] = float(np.mean(ious))
        out["grounding_point_acc"] = float(np.mean(points))
    if "vqa" in by_task:
        hits = [normalize_answer(p) == normalize_answer(r["answer"]) for r, p in by_task["vqa"]]
        out["vqa_acc"] = float(np.mean(hits))
    if "ocr" in by_task:
        out["ocr_em"] = float(
            np.mean([p.strip() == r["answer"].strip() for r, p in by_task["ocr"]])
        )
    if "caption" in by_task:
        pairs = by_task["caption"]
        out["caption_em"] = float(np.mean([p.strip() == r["answer"].strip() for r, p in pairs]))
        out["caption_cider"] = cider_d([p for _, p in pairs], [[r["answer"]] for r, _ in pairs])[0]
    for task, pairs in by_task.items():
        out[f"n_{task}"] = len(pairs)
    return out


def prior_predictions(train_files: Sequence[str], records: Sequence[dict]) -> list[str]:
    """A blind baseline: what a model that never looks at the picture would answer best.

    For each record, the most frequent training answer to the same prompt (single-picture turns of
    `train_files`, official fine-tuning JSON); for grounding, the phrase with the coordinate-wise
    median of the training boxes of that phrase. Scoring these predictions gives the
    question-only prior a trained model must beat to have learned to see.
    """
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    boxes: dict[str, list] = collections.defaultdict(list)
    for path in train_files:
        with open(path) as f:
            samples = json.load(f)
        for s in samples:
            conv = s["conversations"]
            for user, assistant in zip(conv[0::2], conv[1::2], strict=False):
                prompt = synthetic.strip_images(user["value"])
                if user["value"].count("<img>") > 1:
                    continue
                answers[prompt][assistant["value"]] += 1
                if prompt.startswith("<ref>") and "<box>" in assistant["value"]:
                    boxes[prompt].append(grounding.first_box(assistant["value"]))
    out = []
    for r in records:
        prompt = r["prompt"]
        if r["task"] == "grounding" and boxes.get(prompt):
            x1, y1, x2, y2 = (int(v) for v in np.median(np.asarray(boxes[prompt]), axis=0))
            out.append(f"{prompt}<box>({x1},{y1}),({x2},{y2})</box>")
        elif answers.get(prompt):
            out.append(answers[prompt].most_common(1)[0][0])
        else:
            out.append("")
    return out


# ----------------------------------------------------------------------------------- running
def load_records(path: str, *, per_task: int | None = None) -> list[dict]:
    """Evaluation records from a JSON list, keeping the first `per_task` of each task."""
    try:
        with open(path) as f:
            records = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no evaluation records at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        missing = {"task", "images", "prompt", "answer"} - set(r)
        if missing:
            raise ValueError(f"{path}: record {i} ({r.get('id')!r}) lacks {sorted(missing)}")
    if per_task is None:
        return records
    seen: collections.Counter = collections.Counter()
    kept = []
    for r in records:
        if seen[r["task"]] < per_task:
            seen[r["task"]] += 1
            kept.append(r)
    return kept


def run(
    answer_fn: AnswerFn,
    records: Sequence[dict],
    *,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = print,
) -> tuple[dict, list[str]]:
    """Answers every record with `answer_fn` and scores the answers.

    Returns:
      (metrics as `score` returns them, predictions in record order).
    """
    predictions: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        got = answer_fn([r["images"] for r in chunk], [r["prompt"] for r in chunk])
        if len(got) != len(chunk):
            raise ValueError(f"answer_fn returned {len(got)} answers for {len(chunk)} queries")
        predictions.extend(got)
        if progress is not None:
            progress(f"  eval {len(predictions)}/{len(records)}")
    return score(records, predictions), predictions


def format_table(
    metrics: dict, *, title: str = "held-out evaluation", baseline: dict | None = None
) -> str:
    """A short fixed-width table of the headline metrics; `baseline` (e.g. the scores of
    `prior_predictions`) adds a column to compare with."""
    rows = [
        ("grounding acc (IoU>=0.5)", "grounding_acc", "n_grounding"),
        ("grounding centre in box", "grounding_point_acc", "n_grounding"),
        ("VQA accuracy", "vqa_acc", "n_vqa"),
        ("OCR exact match", "ocr_em", "n_ocr"),
        ("caption exact match", "caption_em", "n_caption"),
        ("caption CIDEr-D", "caption_cider", "n_caption"),
    ]
    head = f"{'metric':<26}{'value':>8}"
    if baseline is not None:
        head += f"{'blind prior':>13}"
    lines = [title, head + f"{'n':>6}"]
    for name, key, n in rows:
        if key in metrics:
            line = f"{name:<26}{metrics[key]:>8.3f}"
            if baseline is not None:
                line += f"{baseline[key]:>13.3f}" if key in baseline else f"{'-':>13}"
            lines.append(line + f"{int(metrics.get(n, 0)):>6}")
    return "\n".join(lines)


def save_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------------- plots
def plot_loss_curves(curves: dict[str, Sequence[tuple[int, float]]], path: str) -> str:
    """Writes a PNG of training loss against the global step, one line per stage.

    Args:
      curves: stage name -> [(step, loss), ...]; steps of later stages continue after earlier ones.
      path: the PNG to write.
    """
    # The object-oriented API leaves the user's pyplot backend alone (notebooks keep inline plots).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    offset = 0
    for name, points in curves.items():
        if not points:
            continue
        steps = np.asarray([s for s, _ in points], dtype=float) + offset
        ax.plot(steps, [v for _, v in points], label=name)
        offset = steps.max()
    ax.set_xlabel("optimizer step (stages chained)")
    ax.set_ylabel("training loss (CE per supervised token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_boxes(
    records: Sequence[dict],
    predictions: Sequence[str],
    path: str,
    *,
    max_images: int = 8,
    image_root: str | None = None,
) -> str:
    """Writes a PNG grid of held-out grounding images with the true and the predicted box.

    Boxes are drawn by `grounding.draw_boxes`, labelled "true" and "predicted".

    Args:
      records: grounding records (others are skipped).
      predictions: the model's answers, aligned with records.
      path: the PNG to write.
      max_images: how many images to show.
      image_root: directory of relative image paths (default: the current directory).
    """
    from matplotlib.figure import Figure
    from PIL import Image

    pairs = [(r, p) for r, p in zip(records, predictions, strict=True) if r["task"] == "grounding"]
    pairs = pairs[:max_images]
    if not pairs:
        raise ValueError("plot_boxes: no grounding records to draw")
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = Figure(figsize=(3 * cols, 3.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (r, p) in zip(axes.flat, pairs, strict=False):
        # Upscaled so that the labels of grounding.draw_boxes stay readable on small pictures.
        img = Image.open(image_lib.resolve_path(r["images"][0], image_root)).convert("RGB")
        img = img.resize((max(img.size[0], 336), max(img.size[1], 336)), Image.NEAREST)
        pred = grounding.first_box(p)
        x1, y1, x2, y2 = r["box"]
        px1, py1, px2, py2 = (int(v) for v in pred)
        boxes = f"<ref>true</ref><box>({x1},{y1}),({x2},{y2})</box>"
        boxes += f"<ref>predicted</ref><box>({px1},{py1}),({px2},{py2})</box>"
        ax.imshow(grounding.draw_boxes(img, boxes))
        ax.set_title(f"{r.get('phrase', '')}\nIoU {iou(pred, r['box']):.2f}", fontsize=9)
    fig.suptitle("held-out grounding: true vs predicted boxes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def read_metrics(workdir: str) -> list[tuple[int, float]]:
    """(step, loss) pairs from a training workdir's `metrics.jsonl` (one JSON object per line)."""
    path = os.path.join(workdir, "metrics.jsonl")
    points = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON: {e}") from None
            if "loss" in m and "step" in m:
                points.append((int(m["step"]), float(m["loss"])))
    return points
