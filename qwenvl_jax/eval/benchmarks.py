"""The benchmarks of the published `eval_mm/` scripts: files, prompts, generation lengths, metrics.

`BENCHMARKS` has one entry per `--dataset` name of the scripts. Paths are relative to the
directory the scripts run from (they read `data/<dataset>/...`); `DATA_SOURCES` says where each
dataset's files come from (the eval_mm EVALUATION.md: the images from each dataset's site, the
converted `.jsonl`/`.json` test files from the Qwen-VL bucket). `read_records` turns a test file
into records `{question_id, image, prompt, ...}` with the base-model prompt built exactly as the
script builds it (`qwenvl_jax.chat` wraps it in ChatML for the chat model); `score` applies the
script's metric (`qwenvl_jax.eval.metrics`) to the decoded outputs.

File layouts (one JSON object per line for `.jsonl`):
  vqa (evaluate_vqa.py): `{image, question, question_id, answer?}`; VQAv2/OK-VQA/TextVQA/VizWiz
    score against the official VQA question + annotation files, DocVQA against `val_v1.0.json`
    (`{dataset_name, data: [{questionId, question, answers}]}`), the rest against `answer`.
  grounding (evaluate_grounding.py): `{image, sent, bbox: [x1, y1, x2, y2] pixels, width, height}`.
  caption (evaluate_caption.py): one COCO-style `.json`: `{images: [{id, image}],
    annotations: [{image_id, caption, id}]}`.
  multiple_choice (evaluate_multiple_choice.py): `{image, hint, question, choices, answer: int}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

from qwenvl_jax.eval import metrics

# The prompts of the published scripts (base model).
VQA_PROMPT = "<img>{}</img>{} Answer:"
GROUNDING_PROMPT = "<img>{}</img><ref>{}</ref><box>"
CAPTION_PROMPT = "<img>{}</img>Describe the image in English:"
MULTIPLE_CHOICE_PROMPT = "<img>{}</img>Context: {}\nQuestion: {}\nOptions: {}\nAnswer:"

_BUCKET = "https://ofasys-wlcb.oss-cn-wulanchabu.aliyuncs.com/Qwen-VL/evaluation"
DATA_SOURCES = {
    "coco": "images: http://images.cocodataset.org/zips/{train2014,val2014,test2015}.zip"
    " (VQAv2, OK-VQA, RefCOCO/+/g)",
    "vqav2": f"{_BUCKET}/vqav2/vqav2_{{train,val,testdev}}.jsonl; questions and annotations: "
    "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_{Questions,Annotations}_{Train,Val}_mscoco.zip",
    "okvqa": f"{_BUCKET}/okvqa/okvqa_{{train,val}}.jsonl; questions and annotations: "
    "https://okvqa.allenai.org/static/data/",
    "textvqa": f"{_BUCKET}/textvqa/textvqa_{{train,val}}{{.jsonl,_questions.json,"
    "_annotations.json}}; images: https://dl.fbaipublicfiles.com/textvqa/images/",
    "vizwiz": f"{_BUCKET}/vizwiz/vizwiz_{{train,val,test}}{{.jsonl,_questions.json,"
    "_annotations.json}}; images: https://vizwiz.cs.colorado.edu/VizWiz_final/images/",
    "docvqa": f"{_BUCKET}/docvqa/{{train,val,test}}.jsonl; images and val/val_v1.0.json: "
    "https://www.docvqa.org/datasets",
    "chartqa": f"{_BUCKET}/chartqa/{{train,test}}_{{human,augmented}}.jsonl; images: "
    "https://drive.google.com/file/d/1Lm_w6zeET1Hyl_9ks6w5nEsgpoyPHalV/view",
    "gqa": f"{_BUCKET}/gqa/{{testdev,train}}_balanced.jsonl; images: "
    "https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip",
    "ocrvqa": f"{_BUCKET}/ocrvqa/ocrvqa_{{train,val,test}}.jsonl; images: "
    "https://ocr-vqa.github.io/kvqa_ProjectFiles/README.txt",
    "ai2diagram": f"{_BUCKET}/ai2diagram/{{train,test}}.jsonl; images: "
    "https://ai2-public-datasets.s3.amazonaws.com/diagrams/ai2d-all.zip",
    "scienceqa": f"{_BUCKET}/scienceqa/scienceqa_test_img.jsonl; images: "
    "https://scienceqa.s3.us-west-1.amazonaws.com/images/test.zip",
    "refcoco": f"{_BUCKET}/refcoco/refcoco_{{val,testA,testB}}.jsonl (COCO train2014 images)",
    "refcoco+": f"{_BUCKET}/refcoco%2B/refcoco%2B_{{val,testA,testB}}.jsonl",
    "refcocog": f"{_BUCKET}/refcocog/refcocog_{{val,test}}.jsonl",
    "flickr30k": f"{_BUCKET}/flickr30k/flickr30k_karpathy_{{train,test}}.json; images: "
    "https://bryanplummer.com/Flickr30kEntities/",
    "nocaps": f"{_BUCKET}/nocaps/nocaps_val.json; images: https://nocaps.org/download",
}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One `--dataset` of an eval_mm script.

    Attributes:
      name: the script's dataset name; kind: vqa | grounding | caption | multiple_choice.
      test, train, question, annotation: the files the script reads (relative paths).
      metric: vqa_score | anls | relaxed_accuracy | accuracy | gqa_accuracy | grounding |
        cider | choice_loss; None for splits scored by the dataset's server.
      max_new_tokens, min_new_tokens: greedy decoding lengths (None: scored by per-choice loss).
      strip_output: whether the script `.strip()`s the decoded text before scoring.
    """

    name: str
    kind: str
    test: str
    metric: str | None
    max_new_tokens: int | None
    min_new_tokens: int | None
    train: str | None = None
    question: str | None = None
    annotation: str | None = None
    strip_output: bool = True

    @property
    def prompt_template(self) -> str:
        return {
            "vqa": VQA_PROMPT,
            "grounding": GROUNDING_PROMPT,
            "caption": CAPTION_PROMPT,
            "multiple_choice": MULTIPLE_CHOICE_PROMPT,
        }[self.kind]


# The VQA-style datasets of evaluate_vqa.py: (name, directory, test, train, metric,
# max_new_tokens, question file, annotation file); files are under data/<directory>/.
# QWEN-QUIRK: the GQA train file is data/gqa/train.jsonl while EVALUATION.md downloads
# train_balanced.jsonl (only few-shot prompts read it).
_VQA_TABLE = [
    ("vqav2_val", "vqav2", "vqav2_val.jsonl", "vqav2_train.jsonl", "vqa_score", 10,
     "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
    ("vqav2_testdev", "vqav2", "vqav2_testdev.jsonl", "vqav2_train.jsonl", None, 10, None, None),
    ("okvqa_val", "okvqa", "okvqa_val.jsonl", "okvqa_train.jsonl", "vqa_score", 10,
     "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json"),
    ("textvqa_val", "textvqa", "textvqa_val.jsonl", "textvqa_train.jsonl", "vqa_score", 10,
     "textvqa_val_questions.json", "textvqa_val_annotations.json"),
    ("vizwiz_val", "vizwiz", "vizwiz_val.jsonl", "vizwiz_train.jsonl", "vqa_score", 10,
     "vizwiz_val_questions.json", "vizwiz_val_annotations.json"),
    ("vizwiz_test", "vizwiz", "vizwiz_test.jsonl", "vizwiz_train.jsonl", None, 10, None, None),
    ("docvqa_val", "docvqa", "val.jsonl", "train.jsonl", "anls", 100, None, "val/val_v1.0.json"),
    ("docvqa_test", "docvqa", "test.jsonl", "train.jsonl", None, 100, None, None),
    ("chartqa_test_human", "chartqa", "test_human.jsonl", "train_human.jsonl",
     "relaxed_accuracy", 100, None, None),
    ("chartqa_test_augmented", "chartqa", "test_augmented.jsonl", "train_augmented.jsonl",
     "relaxed_accuracy", 100, None, None),
    ("gqa_testdev", "gqa", "testdev_balanced.jsonl", "train.jsonl", "gqa_accuracy", 10, None, None),
    ("ocrvqa_val", "ocrvqa", "ocrvqa_val.jsonl", "ocrvqa_train.jsonl", "accuracy", 100, None, None),
    ("ocrvqa_test", "ocrvqa", "ocrvqa_test.jsonl", "ocrvqa_train.jsonl", "accuracy", 100, None,
     None),
    ("ai2diagram_test", "ai2diagram", "test.jsonl", "train.jsonl", "accuracy", 10, None, None),
]  # fmt: skip
_REF_SPLITS = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
}


def _data(d: str, f: str | None) -> str | None:
    return None if f is None else f"data/{d}/{f}"


BENCHMARKS = {
    b.name: b
    for b in [
        *[
            Benchmark(n, "vqa", _data(d, te), m, t, 1, _data(d, tr), _data(d, q), _data(d, a))
            for n, d, te, tr, m, t, q, a in _VQA_TABLE
        ],
        Benchmark(
            "scienceqa_test_img",
            "multiple_choice",
            "data/scienceqa/scienceqa_test_img.jsonl",
            "choice_loss",
            None,
            None,
        ),
        *[
            Benchmark(
                f"{ds}_{s}",
                "grounding",
                f"data/{ds}/{ds}_{s}.jsonl",
                "grounding",
                28,
                10,
                strip_output=False,
            )
            for ds, splits in _REF_SPLITS.items()
            for s in splits
        ],
        # QWEN-QUIRK: the script reads data/flickr30k/ (EVALUATION.md says data/flickr) and draws
        # Flickr few-shot examples from the *test* file.
        Benchmark(
            "flickr",
            "caption",
            "data/flickr30k/flickr30k_karpathy_test.json",
            "cider",
            30,
            8,
            train="data/flickr30k/flickr30k_karpathy_test.json",
        ),
        Benchmark("nocaps", "caption", "data/nocaps/nocaps_val.json", "cider", 30, 8),
    ]
}


def get(name: str) -> Benchmark:
    """The registry entry of `name`, with the known names in the error."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def few_shot_prefix(bench: Benchmark, shots: Sequence[dict]) -> str:
    """The few-shot prefix the scripts put before a VQA or caption prompt (no separator).

    Args:
      shots: train records, `{image, question, answer}` (vqa) or `{image, caption}` (caption);
        the scripts draw them with `random.sample` per question.
    """
    if bench.kind == "vqa":
        return "".join(
            VQA_PROMPT.format(s["image"], s["question"]) + f" {s['answer']}" for s in shots
        )
    if bench.kind == "caption":
        return "".join(CAPTION_PROMPT.format(s["image"]) + f" {s['caption']}" for s in shots)
    if shots:
        raise ValueError(f"{bench.name}: the {bench.kind} script has no few-shot prompts")
    return ""


def read_records(bench: Benchmark | str, root: str = ".") -> Iterator[dict]:
    """The test records of a benchmark, each with the script's base-model `prompt`.

    Args:
      bench: a registry entry or its name; root: the directory holding `data/`.

    Yields:
      vqa: `{question_id, image, question, prompt, annotation}` (annotation: the line's
      `answer`, None on test splits); grounding: `{question_id (line index), image, sent, prompt,
      bbox, width, height}`; caption: `{question_id (image id), image, prompt, annotation
      (reference captions)}`; multiple_choice: `{question_id (line index), image, prompt,
      choices, targets (" A", " B", ...), answer (index)}`.
    """
    bench = get(bench) if isinstance(bench, str) else bench
    path = os.path.join(root, bench.test)
    if bench.kind == "caption":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        refs: dict = {}
        for ann in data.get("annotations", []):
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        for img in data["images"]:
            yield {
                "question_id": img["id"],
                "image": img["image"],
                "prompt": CAPTION_PROMPT.format(img["image"]),
                "annotation": refs.get(img["id"], []),
            }
        return
    for i, d in enumerate(_read_jsonl(path)):
        if bench.kind == "vqa":
            prompt = VQA_PROMPT.format(d["image"], d["question"])
            yield {
                **_pick(d, "question_id", "image", "question"),
                "prompt": prompt,
                "annotation": d.get("answer"),
            }
        elif bench.kind == "grounding":
            prompt = GROUNDING_PROMPT.format(d["image"], d["sent"])
            yield {
                "question_id": i,
                **_pick(d, "image", "sent", "bbox", "width", "height"),
                "prompt": prompt,
            }
        else:
            letters = metrics.MULTIPLE_CHOICE_LETTERS[: len(d["choices"])]
            options = "\n".join(f"{k}. {c}" for k, c in zip(letters, d["choices"], strict=True))
            hint = d["hint"] if d["hint"] else "N/A"
            prompt = MULTIPLE_CHOICE_PROMPT.format(d["image"], hint, d["question"], options)
            yield {
                "question_id": i,
                "image": d["image"],
                "prompt": prompt,
                "choices": d["choices"],
                "targets": [" " + k for k in letters],
                "answer": d["answer"],
            }


def _pick(d: dict, *keys: str) -> dict:
    return {k: d[k] for k in keys}


def load_answers(bench: Benchmark, root: str = ".") -> dict:
    """question_id -> ground-truth answers from the official annotation file (vqa_score, anls)."""
    if bench.metric not in ("vqa_score", "anls"):
        raise ValueError(f"{bench.name}: answers come from the test file, not an annotation file")
    with open(os.path.join(root, bench.annotation), encoding="utf-8") as f:
        data = json.load(f)
    if bench.metric == "vqa_score":
        return {a["question_id"]: a["answers"] for a in data["annotations"]}
    return {int(d["questionId"]): d["answers"] for d in data["data"]}


def score(
    bench: Benchmark | str,
    records: Sequence[dict],
    outputs: Sequence,
    root: str = ".",
    *,
    subset: bool = False,
) -> float:
    """The number the script prints, from the records and the model's outputs in record order.

    Args:
      outputs: the decoded texts (as decoded, unstripped; the script's stripping is applied
        here), or for `choice_loss` each record's per-choice losses (`metrics.choice_losses`).
      subset: the records are part of the test file (an `--limit` run): VQA score and ANLS
        average over these questions only (the scripts average over every annotated one).

    Returns:
      vqa_score in percent (2 decimals); the other metrics as fractions; CIDEr as COCOEvalCap.
    """
    bench = get(bench) if isinstance(bench, str) else bench
    if bench.metric is None:
        raise ValueError(f"{bench.name} has no public answers: submit to its evaluation server")
    if len(outputs) != len(records):
        raise ValueError(f"{bench.name}: {len(outputs)} outputs for {len(records)} records")
    if bench.metric == "choice_loss":
        return metrics.multiple_choice_accuracy(outputs, [r["answer"] for r in records])
    texts = [o.strip() for o in outputs] if bench.strip_output else list(outputs)
    if bench.metric in ("vqa_score", "anls"):
        key = int if bench.metric == "anls" else (lambda q: q)
        preds = {key(r["question_id"]): t for r, t in zip(records, texts, strict=True)}
        fn = metrics.vqa_score if bench.metric == "vqa_score" else metrics.anls_score
        answers = load_answers(bench, root)
        if subset:
            answers = {q: answers[q] for q in preds}
        return fn(preds, answers)
    if bench.metric == "grounding":
        sizes = [(r["width"], r["height"]) for r in records]
        return metrics.grounding_accuracy(texts, [r["bbox"] for r in records], sizes)
    if bench.metric == "cider":
        preds = {r["question_id"]: t for r, t in zip(records, texts, strict=True)}
        return metrics.cider(preds, {r["question_id"]: r["annotation"] for r in records})[0]
    annotations = [r["annotation"] for r in records]
    if bench.metric == "relaxed_accuracy":
        return metrics.relaxed_accuracy(texts, annotations)
    if bench.metric == "gqa_accuracy":
        texts = [metrics.gqa_postprocess(t) for t in texts]
    return metrics.exact_match_accuracy(texts, annotations)
