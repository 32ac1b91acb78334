"""A synthetic grounding/OCR world: seeded pictures of coloured shapes and words.

Each picture is a light background cut into a `grid` x `grid` layout of cells; up to
`max_shapes` shapes (circle, square, triangle; each type and each colour at most once per picture)
and at most one rendered word occupy distinct cells, each at a random size and position inside its
cell. Because types and colours are unique within a picture, every question has one answer and
every phrase one box.

From each picture we write samples for the tasks of the paper (captioning, VQA, referring
grounding, grounded captioning, OCR with `<quad>`), multi-turn chat and a two-picture question, as
JSON files in the official Qwen-VL fine-tuning format (`{"id", "conversations": [{"from",
"value"}]}` with `Picture k: <img>path</img>\\n` prefixes), one file per stage and split:

- `stage1_{split}.json`: captions and grounding pairs (the pre-training stage).
- `stage2_{split}.json`: the multi-task mix (all single-turn tasks).
- `stage3_{split}.json`: chat (multi-turn dialogue, the two-picture question, single-turn tasks).
- `drill_{split}.json`: "What colour is the <shape>?" for every shape of every picture, and
  `drill_ground_{split}.json`: the referring phrase (`<ref>the red circle</ref>`) of every object
  of every picture, single turn (the demo's two drills between stages 2 and 3; `qwenvl_jax.demo`).
- `eval.json`: the held-out evaluation records (`task`, `images`, `prompt`, `answer`, and `box`
  for grounding), read by `qwenvl_jax.demo.evaluate`.
- `corpus.txt`: the training texts without image paths, for the SentencePiece vocabulary (the
  drills repeat stage-2 prompts and are left out).
- `manifest.json`: the generation settings; `generate` reuses a directory whose manifest matches.

Boxes are integers normalised to [0, 1000) (`int(x / width * 1000)`), written
`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`; an OCR quad is the word's four corners clockwise from
the top-left, `<ref>word</ref><quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qwenvl_jax import chat, grounding

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 55, 180),
}
SHAPES = ("circle", "square", "triangle")
WORDS = (
    "cat", "dog", "sun", "map", "box", "jax", "tpu", "key",
    "moon", "tree", "fish", "bird", "ship", "star", "book", "lamp",
)  # fmt: skip
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Prompts modelled on the official evaluation prompts (eval_mm/), in chat form.
CAPTION_PROMPT = "Describe the image in English:"
GROUNDED_CAPTION_PROMPT = "Generate the caption in English with grounding:"
OCR_PROMPT = "What is the word in the image? Answer:"
OCR_QUAD_PROMPT = "Read the text in the image with its position:"
TASKS = ("caption", "vqa", "grounding", "grounded_caption", "ocr", "ocr_quad")
EVAL_TASKS = ("grounding", "vqa", "ocr", "caption")
FORMAT_VERSION = 4


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What pictures look like.

    Attributes:
        image_size: side of the square PNGs in pixels.
        grid: cells per side; objects occupy distinct cells.
        min_shapes / max_shapes: shapes per picture (at most len(SHAPES), at most grid**2 - 1).
        word_prob: probability that a picture holds a word.
        min_fill / max_fill: an object's size as a fraction of its cell side.
    """

    image_size: int = 112
    grid: int = 2
    min_shapes: int = 1
    max_shapes: int = 3
    word_prob: float = 0.8
    min_fill: float = 0.5
    max_fill: float = 0.9

    def __post_init__(self):
        if not 1 <= self.min_shapes <= self.max_shapes <= min(len(SHAPES), self.grid**2 - 1):
            top = min(len(SHAPES), self.grid**2 - 1)
            raise ValueError(
                f"WorldConfig: need 1 <= min_shapes <= max_shapes <= {top} (shape types, one cell"
                f" kept for a word); got {self.min_shapes}..{self.max_shapes}"
            )
        if not 0 < self.min_fill <= self.max_fill <= 1:
            raise ValueError(f"WorldConfig: need 0 < min_fill <= max_fill <= 1, got {self}")
        if self.image_size < 16 * self.grid:
            raise ValueError(
                f"WorldConfig: image_size={self.image_size} too small for grid={self.grid}"
            )


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object of a scene. `box` is in pixels (x1, y1, x2, y2), exclusive right/bottom edge."""

    kind: str  # a shape name, or "word"
    colour: str  # a colour name; "black" for words
    box: tuple[int, int, int, int]
    text: str = ""

    @property
    def phrase(self) -> str:
        """The referring phrase, e.g. 'the red circle' or 'the word cat'."""
        return f"the word {self.text}" if self.kind == "word" else f"the {self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A picture's content: a background colour and its objects in reading order of their cells."""

    size: int
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]
    font_size: int = 0

    @property
    def shapes(self) -> tuple[Obj, ...]:
        return tuple(o for o in self.objects if o.kind != "word")

    @property
    def word(self) -> Obj | None:
        return next((o for o in self.objects if o.kind == "word"), None)


def make_scene(rng: np.random.Generator, world: WorldConfig = WorldConfig()) -> Scene:
    """Draws a random scene.

    Args:
        rng: the random source (consumed).
        world: layout settings.

    Returns:
        A Scene whose objects are in reading order (top-left cell first).
    """
    s, g = world.image_size, world.grid
    cell = s / g
    n_shapes = int(rng.integers(world.min_shapes, world.max_shapes + 1))
    has_word = bool(rng.random() < world.word_prob)
    cells = rng.permutation(g * g)[: n_shapes + has_word]
    kinds = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_shapes]]
    colour_names = list(COLOURS)
    colours = [colour_names[i] for i in rng.permutation(len(colour_names))[:n_shapes]]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    font_size = 0
    objects = []
    for j, c in enumerate(cells):
        cx0, cy0 = (c % g) * cell, (c // g) * cell
        if j < n_shapes:
            side = rng.uniform(world.min_fill, world.max_fill) * cell
            x0 = cx0 + rng.uniform(0, cell - side)
            y0 = cy0 + rng.uniform(0, cell - side)
            box = (round(x0), round(y0), round(x0 + side), round(y0 + side))
            objects.append(Obj(kinds[j], colours[j], box))
        else:
            text = WORDS[int(rng.integers(len(WORDS)))]
            font_size = _fit_word(text, rng.uniform(world.min_fill, world.max_fill) * cell)
            _, _, w, h = _ink(text, font_size)
            x0 = cx0 + rng.uniform(0, max(cell - w, 0))
            y0 = cy0 + rng.uniform(0, max(cell - h, 0))
            box = (round(x0), round(y0), round(x0) + w, round(y0) + h)
            objects.append(Obj("word", "black", box, text=text))
    order = np.argsort(cells, kind="stable")
    return Scene(s, background, tuple(objects[i] for i in order), font_size)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def _ink(text: str, size: int) -> tuple[int, int, int, int]:
    """Where `text` drawn at (0, 0) puts ink: (dx, dy, w, h), so the annotated box is tight."""
    font = _font(size)
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (x1 + 2, y1 + 2), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    ix0, iy0, ix1, iy1 = mask.getbbox()
    return ix0, iy0, ix1 - ix0, iy1 - iy0


def _fit_word(text: str, width: float) -> int:
    """The largest font size whose ink for `text` is at most `width` px wide (at least 6)."""
    size = 6
    for cand in range(7, 200):
        if _ink(text, cand)[2] > width:
            break
        size = cand
    return size


def render(scene: Scene) -> Image.Image:
    """Draws a scene as an RGB PIL image of scene.size x scene.size pixels."""
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        if o.kind == "word":
            dx, dy, _, _ = _ink(o.text, scene.font_size)
            draw.text((x1 - dx, y1 - dy), o.text, fill=(10, 10, 10), font=_font(scene.font_size))
        elif o.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[o.colour])
        elif o.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[o.colour])
        elif o.kind == "triangle":
            draw.polygon(
                [((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=COLOURS[o.colour]
            )
        else:
            raise ValueError(f"unknown object kind {o.kind!r}")
    return img


# ------------------------------------------------------------------------------------------- text


def norm_box(box: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """Pixel box -> ints in [0, 1000) as Qwen-VL writes them: int(x / size * 1000), at most 999."""
    return tuple(min(int(v / size * 1000), 999) for v in box)


def box_text(box: tuple[int, int, int, int], size: int) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` of a pixel box."""
    return grounding.box_text(norm_box(box, size))


def quad_text(box: tuple[int, int, int, int], size: int) -> str:
    """`<quad>…</quad>` of an axis-aligned pixel box: its corners clockwise from the top-left."""
    x1, y1, x2, y2 = norm_box(box, size)
    return grounding.quad_text((x1, y1, x2, y1, x2, y2, x1, y2))


def _a(o: Obj) -> str:
    return f"the word {o.text}" if o.kind == "word" else f"a {o.colour} {o.kind}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """E.g. 'a red circle, a blue square and the word cat' (objects in reading order)."""
    return _join([_a(o) for o in scene.objects])


def grounded_caption(scene: Scene) -> str:
    """The caption with each object as `<ref>a red circle</ref><box>…</box>`."""
    return _join([f"<ref>{_a(o)}</ref>{box_text(o.box, scene.size)}" for o in scene.objects])


def grounding_answer(o: Obj, size: int) -> str:
    return f"<ref>{o.phrase}</ref>{box_text(o.box, size)}"


def colour_question(o: Obj) -> tuple[str, str]:
    """("What colour is the <shape>? Answer:", its colour)."""
    return f"What colour is the {o.kind}? Answer:", o.colour


def grounding_pair(o: Obj, size: int) -> tuple[str, str]:
    """(`<ref>phrase</ref>`, the same with the object's box): a referring-grounding turn."""
    return f"<ref>{o.phrase}</ref>", grounding_answer(o, size)


def vqa_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Every (question, one-word answer) the scene supports."""
    qa = [colour_question(o) for o in scene.shapes]
    qa += [(f"What shape is the {o.colour} object? Answer:", o.kind) for o in scene.shapes]
    qa.append(("How many shapes are there? Answer:", NUMBERS[len(scene.shapes)]))
    return qa


def picture(paths: list[str]) -> str:
    """The `Picture k: <img>path</img>\\n` prefix of a user turn."""
    return "".join(f"Picture {k}: <img>{p}</img>\n" for k, p in enumerate(paths, 1))


def task_sample(task: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str, dict]:
    """One single-turn sample of `task`: (prompt without picture prefix, answer, extra fields).

    Raises:
        ValueError: for an unknown task, or an OCR task on a scene without a word.
    """
    if task == "caption":
        return CAPTION_PROMPT, caption(scene), {}
    if task == "grounded_caption":
        return GROUNDED_CAPTION_PROMPT, grounded_caption(scene), {}
    if task == "vqa":
        qa = vqa_pairs(scene)
        q, a = qa[int(rng.integers(len(qa)))]
        return q, a, {}
    if task == "grounding":
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        q, a = grounding_pair(o, scene.size)
        return q, a, {"box": list(norm_box(o.box, scene.size)), "phrase": o.phrase}
    if task in ("ocr", "ocr_quad"):
        w = scene.word
        if w is None:
            raise ValueError(f"task {task!r} needs a scene with a word")
        if task == "ocr":
            return OCR_PROMPT, w.text, {}
        return OCR_QUAD_PROMPT, f"<ref>{w.text}</ref>{quad_text(w.box, scene.size)}", {}
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _tasks_for(scene: Scene) -> tuple[str, ...]:
    return TASKS if scene.word is not None else tuple(t for t in TASKS if not t.startswith("ocr"))


def chat_sample(scene: Scene, path: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """A 2-3 turn dialogue about one picture: [(user, assistant), ...]; the picture is in turn 1."""
    turns = [("What is in the picture?", f"I see {caption(scene)}.")]
    o = scene.shapes[int(rng.integers(len(scene.shapes)))]
    turns.append(colour_question(o))
    turns.append(grounding_pair(o, scene.size))
    n = int(rng.integers(2, 4))
    turns = turns[:1] + turns[1 + (3 - n) :]
    return [(picture([path]) + turns[0][0], turns[0][1])] + turns[1:]


def two_picture_sample(
    scenes: tuple[Scene, Scene], paths: tuple[str, str], rng: np.random.Generator
) -> tuple[str, str] | None:
    """'Which picture shows the red circle?' where exactly one of the two does; else None."""
    a = {o.phrase for o in scenes[0].shapes}
    b = {o.phrase for o in scenes[1].shapes}
    only = sorted((a - b) | (b - a))
    if not only:
        return None
    phrase = only[int(rng.integers(len(only)))]
    answer = "Picture 1" if phrase in a else "Picture 2"
    return picture(list(paths)) + f"Which picture shows {phrase}? Answer:", answer


# ------------------------------------------------------------------------------------------- files


def _conv(sample_id: str, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for user, assistant in turns:
        conv.append({"from": "user", "value": user})
        conv.append({"from": "assistant", "value": assistant})
    return {"id": sample_id, "conversations": conv}


def _shuffle_answers(samples: list[dict], rng: np.random.Generator) -> None:
    """Permutes the assistant turns among samples of the same task (id prefix), in place."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, s in enumerate(samples):
        task = s["id"].split("-")[1]
        for j, m in enumerate(s["conversations"]):
            if m["from"] == "assistant":
                groups.setdefault(f"{task}/{j}", []).append((i, j))
    for slots in groups.values():
        values = [samples[i]["conversations"][j]["value"] for i, j in slots]
        for (i, j), k in zip(slots, rng.permutation(len(values)), strict=True):
            samples[i]["conversations"][j]["value"] = values[k]


def _image_path(split: str, index: int) -> str:
    """A picture's path relative to the dataset directory (short: it must fit an `<img>` span of
    a tiny model, `n_queries` - 1 bytes)."""
    return f"images/{split}/{index:06d}.png"


def _scene_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 0, "heldout": 1}[split], index, stream])


def _settings(n_train, n_heldout, seed, shuffle_labels, world) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "n_train": n_train,
        "n_heldout": n_heldout,
        "seed": seed,
        "shuffle_labels": shuffle_labels,
        "world": dataclasses.asdict(world),
    }


def generate(
    out_dir: str,
    *,
    n_train: int = 2000,
    n_heldout: int = 200,
    seed: int = 0,
    shuffle_labels: bool = False,
    world: WorldConfig = WorldConfig(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the synthetic dataset into `out_dir` (reusing it when its manifest matches).

    Each picture gives stage 1 a caption, a grounding pair and a grounded caption; stage 2 one
    sample of every task of the multi-task mix it supports (a random question or object where the
    task has several); stage 3 one dialogue, single-turn task or (every fourth picture) a question
    about it and the next picture; the drills every colour question and every referring phrase
    of it. Picture paths are relative to `out_dir` (where the JSON files are, so the data
    pipeline resolves them; pass `image_root=out_dir` to `QwenVL` to chat about them).

    Args:
        out_dir: the dataset directory (created).
        n_train: training pictures.
        n_heldout: held-out pictures (a disjoint random stream).
        seed: the seed; the same arguments always give byte-identical files.
        shuffle_labels: permute the training answers among samples of the same task (the
            chance-level control; held-out files keep the true answers).
        world: layout settings.
        overwrite: regenerate even if a matching dataset exists.

    Returns:
        The manifest dict: settings plus `files` (name -> absolute path) and per-file sample counts.

    Raises:
        FileExistsError: `out_dir` holds a dataset with other settings and `overwrite` is False.
    """
    out_dir = os.path.abspath(out_dir)
    settings = _settings(n_train, n_heldout, seed, shuffle_labels, world)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path) and not overwrite:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("settings") == settings:
            return manifest
        raise FileExistsError(
            f"{out_dir} holds a synthetic dataset made with other settings "
            f"({manifest.get('settings')}); pass overwrite=True or use another directory"
        )
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        scenes, paths = [], []
        for i in range(n):
            scene = make_scene(_scene_rng(seed, split, i, 0), world)
            path = _image_path(split, i)
            render(scene).save(os.path.join(out_dir, path), format="PNG")
            scenes.append(scene)
            paths.append(path)
        stages = _stage_samples(split, scenes, paths, seed)
        if split == "train" and shuffle_labels:
            for stage, samples in stages.items():
                _shuffle_answers(samples, np.random.default_rng([seed, 7, SHUFFLE_STREAM[stage]]))
        for stage, samples in stages.items():
            name = f"{stage}_{split}"
            files[name] = os.path.join(out_dir, f"{name}.json")
            counts[name] = len(samples)
            _write_json(files[name], samples)
        if split == "train":
            files["corpus"] = os.path.join(out_dir, "corpus.txt")
            with open(files["corpus"], "w") as f:
                # The ChatML frame's words (the default system prompt and the roles) are in
                # every sample: give them pieces of their own.
                f.write(f"system\n{chat.SYSTEM}\nuser\nassistant\n" * 50)
                for stage in ("stage1", "stage2", "stage3"):
                    for s in stages[stage]:
                        for m in s["conversations"]:
                            f.write(strip_images(m["value"]).strip() + "\n")
        else:
            records = eval_records(scenes, paths, seed)
            files["eval"] = os.path.join(out_dir, "eval.json")
            counts["eval"] = len(records)
            _write_json(files["eval"], records)
    manifest = {"settings": settings, "files": files, "counts": counts}
    _write_json(manifest_path, manifest)
    return manifest


SHUFFLE_STREAM = {"stage1": 1, "stage2": 2, "stage3": 3, "drill": 4, "drill_ground": 5}


def _stage_samples(split: str, scenes: list[Scene], paths: list[str], seed: int) -> dict:
    stage1, stage2, stage3, drill, drill_ground = [], [], [], [], []
    for i, (scene, path) in enumerate(zip(scenes, paths, strict=True)):
        rng = _scene_rng(seed, split, i, 1)
        pic = picture([path])
        for k, o in enumerate(scene.shapes):
            q, a = colour_question(o)
            drill.append(_conv(f"{split}-vqa{k}-{i:06d}", [(pic + q, a)]))
        for k, o in enumerate(scene.objects):
            q, a = grounding_pair(o, scene.size)
            drill_ground.append(_conv(f"{split}-grounding{k}-{i:06d}", [(pic + q, a)]))
        for task in ("caption", "grounding", "grounded_caption"):
            q, a, _ = task_sample(task, scene, rng)
            stage1.append(_conv(f"{split}-{task}-{i:06d}", [(pic + q, a)]))
        tasks = _tasks_for(scene)
        for task in tasks:
            q, a, _ = task_sample(task, scene, rng)
            stage2.append(_conv(f"{split}-{task}-{i:06d}", [(pic + q, a)]))
        kind = i % 4
        pair = None
        if kind == 3:
            j = (i + 1) % len(scenes)
            pair = two_picture_sample((scene, scenes[j]), (path, paths[j]), rng)
        if pair is not None:
            stage3.append(_conv(f"{split}-twopic-{i:06d}", [pair]))
        elif kind == 0:
            stage3.append(_conv(f"{split}-chat-{i:06d}", chat_sample(scene, path, rng)))
        else:
            task = tasks[(i // 4 + kind) % len(tasks)]
            q, a, _ = task_sample(task, scene, rng)
            stage3.append(_conv(f"{split}-{task}-{i:06d}", [(pic + q, a)]))
    return {
        "stage1": stage1,
        "stage2": stage2,
        "stage3": stage3,
        "drill": drill,
        "drill_ground": drill_ground,
    }


def eval_records(scenes: list[Scene], paths: list[str], seed: int) -> list[dict]:
    """Held-out evaluation records: for each picture, one of each task in EVAL_TASKS it supports.

    Each record: `id`, `task`, `images` (paths), `prompt` (user text after the picture prefix),
    `answer` (the reference), and for grounding `box` ([x1, y1, x2, y2] in [0, 1000)) and `phrase`.
    """
    records = []
    for i, (scene, path) in enumerate(zip(scenes, paths, strict=True)):
        rng = _scene_rng(seed, "heldout", i, 2)
        for task in EVAL_TASKS:
            if task == "ocr" and scene.word is None:
                continue
            q, a, extra = task_sample(task, scene, rng)
            records.append(
                {"id": f"heldout-{task}-{i:06d}", "task": task, "images": [path], "prompt": q,
                 "answer": a, **extra}
            )  # fmt: skip
    return records


_IMG_RE = re.compile(r"Picture \d+: <img>.*?</img>\n?|<img>.*?</img>", re.S)


def strip_images(text: str) -> str:
    """Removes `Picture k: <img>…</img>` spans (paths must not shape the vocabulary)."""
    return _IMG_RE.sub("", text)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
