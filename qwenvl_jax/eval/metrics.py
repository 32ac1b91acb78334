"""The scores of the published `eval_mm/` scripts, reimplemented in plain Python and numpy.

Each function reproduces what the published script computes, quirks included (marked
`# QWEN-QUIRK:`), so numbers are comparable with the paper's tables:

- `vqa_accuracy` / `vqa_score`: VQAv2, OK-VQA, TextVQA, VizWiz (`vqa_eval.py`, the LAVIS copy of
  the official VQA evaluation).
- `anls` / `anls_score`: DocVQA (`infographicsvqa_eval.py`, tau = 0.5).
- `relaxed_match` / `relaxed_accuracy`: ChartQA (`evaluate_vqa.py`, 5 % relative tolerance).
- `exact_match` / `exact_match_accuracy`, with `gqa_postprocess` first for GQA: GQA, OCR-VQA, AI2D.
- `grounding_iou` / `grounding_accuracy`: RefCOCO/+/g Acc@0.5 (`evaluate_grounding.py`).
- `choice_losses` / `multiple_choice_accuracy`: ScienceQA-Img (`evaluate_multiple_choice.py`).
- `cider`: Flickr30K, NoCaps (pycocoevalcap, as `evaluate_caption.py` uses it; needs Java).

Predictions are the decoded texts as the scripts hold them: `.strip()`-ed for the VQA-style and
caption scripts, unstripped for grounding (see `benchmarks.Benchmark.strip_output`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from qwenvl_jax.grounding import first_box

# ------------------------------------------------------------------------ VQA accuracy tables
# The normalisation tables of the official VQA evaluation (data, as `vqa_eval.py` has them).
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip
# QWEN-QUIRK: `(?!<=\d)` is a typo for the look-behind `(?<!\d)`: it is a look-ahead that never
# fails here, so a period is removed unless a digit follows it ("3.5" keeps it, "5." loses it).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# QWEN-QUIRK: the script calls `sub('', text, re.UNICODE)`, which is `count=32`: only the first
# 32 periods are removed.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, strip periods."""
    out = text
    # A mark is deleted when it touches a space somewhere in the text, or the text has a
    # digit,digit comma anywhere; otherwise it becomes a space. Tests look at the input text.
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in VQA_PUNCTUATION:
        out = out.replace(mark, "" if glue or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_SUB_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, no articles."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize_prediction(text: str) -> str:
    """A model answer as `VQAEval.evaluate` compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str | Mapping]) -> float:
    """VQA accuracy of one answer: mean over the humans of min(#others matching / 3, 1).

    Args:
      prediction: the model's answer.
      answers: the human answers (10 for VQAv2), as strings or as the annotation file's dicts
        (`{"answer", "answer_confidence", "answer_id"}`).

    Returns:
      accuracy in [0, 1].
    """
    pred = vqa_normalize_prediction(prediction)
    texts = [a["answer"] if isinstance(a, Mapping) else a for a in answers]
    # QWEN-QUIRK: human answers get only the punctuation step (no lower-casing, number words or
    # articles), and only when they disagree; the prediction always gets both steps.
    if len(set(texts)) > 1:
        texts = [vqa_process_punctuation(t) for t in texts]
    # QWEN-QUIRK: "leave one out" drops every answer *equal* to the held-out one (dict equality),
    # so identical answer dicts leave together; plain strings are kept apart by their position.
    items = [
        {**a, "answer": t} if isinstance(a, Mapping) else (i, t)
        for i, (a, t) in enumerate(zip(answers, texts, strict=True))
    ]
    accs = []
    for held_out in items:
        matches = sum(1 for it, t in zip(items, texts, strict=True) if it != held_out and t == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_score(predictions: Mapping, answers: Mapping) -> float:
    """The script's `accuracy['overall']`: 100 x mean VQA accuracy, rounded to 2 decimals.

    Args:
      predictions: question_id -> answer; answers: question_id -> human answers. Every
        annotated question must have a prediction.
    """
    accs = [vqa_accuracy(predictions[q], a) for q, a in answers.items()]
    return round(100 * sum(accs) / len(accs), 2)


# ----------------------------------------------------------------------------------- ANLS
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        prev, row[0] = row[0], j
        for i, ca in enumerate(a, 1):
            prev, row[i] = row[i], min(row[i] + 1, row[i - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalized Levenshtein similarity of one answer (DocVQA).

    Both sides are lower-cased with whitespace squeezed before the distance is taken.

    Returns:
      1 - min normalized distance over the answers, or 0 when that is below `threshold`.
    """
    if not answers:
        raise ValueError("ANLS needs at least one ground-truth answer")
    pred = " ".join(prediction.strip().lower().split())
    dists = []
    for ans in answers:
        # QWEN-QUIRK: the normaliser is the length of the *raw* strings (upper-cased), while the
        # distance is taken between the normalised ones.
        length = max(len(ans.upper()), len(prediction.upper()))
        dist = levenshtein(" ".join(ans.strip().lower().split()), pred)
        dists.append(0.0 if length == 0 else dist / length)
    score = 1 - min(dists)
    return 0.0 if score < threshold else score


def anls_score(predictions: Mapping, answers: Mapping, threshold: float = 0.5) -> float:
    """Mean ANLS over the annotated questions (questionId -> answer / answers)."""
    return sum(anls(predictions[q], a, threshold) for q, a in answers.items()) / len(answers)


# --------------------------------------------------------------- relaxed and exact accuracy
def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, annotation: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed correctness of one answer against one annotation.

    Numbers ("12", "12.5", "12%" read as 0.12) count within 5 %; anything else must match
    case-insensitively.
    """
    pred = prediction.strip()
    # QWEN-QUIRK: the script passes the prediction as pix2struct's `target` and the annotation as
    # its `prediction`, so the change is relative to the *prediction*, a zero prediction falls
    # back to string comparison, and only the prediction is stripped.
    pred_value, ann_value = _to_float(pred), _to_float(annotation)
    if ann_value is not None and pred_value:
        return abs(ann_value - pred_value) / abs(pred_value) <= max_relative_change
    return pred.lower() == annotation.lower()


def _as_list(annotation: str | Sequence[str]) -> list[str]:
    return [annotation] if isinstance(annotation, str) else list(annotation)


def relaxed_accuracy(predictions: Sequence[str], annotations: Sequence) -> float:
    """Fraction of answers within ChartQA's relaxed correctness of any of their annotations."""
    hits = [
        max(relaxed_match(p, a) for a in _as_list(anns))
        for p, anns in zip(predictions, annotations, strict=True)
    ]
    return sum(hits) / len(hits)


def exact_match(prediction: str, annotation: str | Sequence[str]) -> float:
    """1.0 when the stripped, lower-cased answer equals any stripped, lower-cased annotation."""
    pred = prediction.strip().lower()
    return max(1.0 if pred == a.strip().lower() else 0.0 for a in _as_list(annotation))


def gqa_postprocess(response: str) -> str:
    """The answer clean-up `evaluate_vqa.py` applies for GQA before exact match.

    Keeps the first clause (up to ".", "," or "!"), lower-cases, then for each marker in turn
    ("is ", "are ", "a ", "an ", "the ") found *anywhere*, keeps what follows its first
    occurrence, and cuts at " of".
    """
    text = response.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    # QWEN-QUIRK: markers are substrings, not words: "this is red" -> "" ("th|is |is red" keeps
    # the empty piece between the two matches), "pizza box" -> "box".
    for marker in ("is ", "are ", "a ", "an ", "the "):
        if marker in text:
            text = text.split(marker)[1]
    if " of" in text:
        text = text.split(" of")[0]
    return text.strip()


def exact_match_accuracy(predictions: Sequence[str], annotations: Sequence) -> float:
    """Mean `exact_match` (GQA / OCR-VQA / AI2D; post-process GQA answers first)."""
    hits = [exact_match(p, a) for p, a in zip(predictions, annotations, strict=True)]
    return sum(hits) / len(hits)


# ------------------------------------------------------------------------------ grounding
def grounding_iou(answer: str, gt_bbox: Sequence[float], width: float, height: float) -> float:
    """IoU of the answer's box, scaled to pixels, with the ground-truth pixel box (x1, y1, x2, y2).

    Computed in float32 in the script's order of operations, so the 0.5 threshold falls where it
    does for the script. Returns nan when the union is empty.
    """
    f32 = np.float32
    # The script's box regex (`first_box`): the first (x1,y1),(x2,y2); none parses as zeros.
    pred = np.asarray(first_box(answer), f32) / f32(999)
    # QWEN-QUIRK: the grid is divided by 999 (not 1000) and boxes are neither clipped to the image
    # nor re-ordered; a box with x2 < x1 gets a negative area (torchvision's `box_area`).
    pred[0::2] *= f32(width)
    pred[1::2] *= f32(height)
    gt = np.asarray(gt_bbox, f32)
    area_p = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_g = (gt[2] - gt[0]) * (gt[3] - gt[1])
    wh = np.maximum(np.minimum(pred[2:], gt[2:]) - np.maximum(pred[:2], gt[:2]), f32(0))
    inter = wh[0] * wh[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(inter / (area_p + area_g - inter))


def grounding_accuracy(
    answers: Sequence[str], gt_bboxes: Sequence, sizes: Sequence[tuple[float, float]]
) -> float:
    """Acc@0.5 ("Precision @ 1"): fraction of answers with IoU >= 0.5.

    Args:
      answers: decoded texts (unstripped); gt_bboxes: pixel boxes; sizes: (width, height) each.
    """
    hits = [
        grounding_iou(a, b, w, h) >= 0.5
        for a, b, (w, h) in zip(answers, gt_bboxes, sizes, strict=True)
    ]
    return sum(hits) / len(hits)


# -------------------------------------------------------------------------- multiple choice
MULTIPLE_CHOICE_LETTERS = ("A", "B", "C", "D", "E")


def choice_losses(
    token_losses: Sequence[Sequence[float]], target_lengths: Sequence[int]
) -> np.ndarray:
    """Per-choice scores: the mean loss over each choice's last `target_lengths[i]` tokens.

    Args:
      token_losses: for each choice, the next-token cross-entropy over its whole row (prompt
        then " A" / " B" / ...), float32, shape [C, T] or ragged.
      target_lengths: the number of tokens of each choice's target (" A" is one token).

    Returns:
      float32 array [C].
    """
    return np.array(
        [
            np.asarray(r, np.float32)[-n:].mean(dtype=np.float32)
            for r, n in zip(token_losses, target_lengths, strict=True)
        ],
        np.float32,
    )


def multiple_choice_accuracy(losses: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Fraction of questions whose lowest-loss choice is the answer index (first on ties)."""
    hits = [
        int(np.argmin(np.asarray(c, np.float32))) == a for c, a in zip(losses, answers, strict=True)
    ]
    return sum(hits) / len(hits)


# ------------------------------------------------------------------------------------ CIDEr
def cider(predictions: Mapping, references: Mapping[object, Sequence[str]]) -> tuple[float, dict]:
    """CIDEr-D as `COCOEvalCap` computes it: PTB-tokenise (Java), then pycocoevalcap's Cider.

    Args:
      predictions: image_id -> caption; references: image_id -> reference captions. The image ids
        scored are those of `references` (COCOEvalCap scores every image of the test file).

    Returns:
      (corpus CIDEr, per-image CIDEr dict).
    """
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError("CIDEr needs pycocoevalcap: pip install 'qwenvl_jax[eval]'") from e
    ids = list(references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    score, per_image = Cider().compute_score(gts, res)
    return float(score), {i: float(s) for i, s in zip(gts, per_image, strict=True)}
