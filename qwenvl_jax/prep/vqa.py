"""A.2 VQAv2: one answer per question, "selected based on the maximum confidence".

  python -m qwenvl_jax.prep vqav2 --input=v2_OpenEnded_mscoco_train2014_questions.json
      --annotations=v2_mscoco_train2014_annotations.json --image_root=/data/coco --output=out/vqav2

Each question has ten crowd answers, each with the worker's `answer_confidence` (yes / maybe / no).
An answer's confidence is the sum over the workers who gave it of yes = 1, maybe = 0.5, no = 0; the
answer with the largest sum is kept; ties go to the answer more workers gave, then to the official
`multiple_choice_answer`, then to the first given. Output lines are the trainer's `vqa` task
(`{"image", "question", "answer", "question_id"}`), the image a path under `--image_root` (COCO
2014: `<subtype>/COCO_<subtype>_<image_id:012d>.jpg`, not copied).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.prep import runner
from qwenvl_jax.prep.steps import Context, Drop, Step

HELP = "A.2: VQAv2 questions + annotations -> one max-confidence answer per question"
CONFIDENCE = {"yes": 1.0, "maybe": 0.5, "no": 0.0}
IMAGE_PATTERN = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg"


def max_confidence_answer(answers: list[dict], official: str | None = None) -> str:
    """The answer with the largest summed confidence (see the module docstring for ties)."""
    score: dict[str, float] = {}
    count: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        text = str(a["answer"]).strip()
        conf = CONFIDENCE.get(str(a.get("answer_confidence", "yes")).lower(), 0.0)
        score[text] = score.get(text, 0.0) + conf
        count[text] = count.get(text, 0) + 1
        first.setdefault(text, i)
    if not score:
        raise Drop("no_answer")
    return max(score, key=lambda t: (score[t], count[t], t == official, -first[t]))


def _load_json(path: str, flag: str) -> dict:
    try:
        return json.loads(fileio.read_text(path))
    except FileNotFoundError:
        raise MissingPathError(f"{flag}={path}: file not found") from None
    except ValueError as e:
        raise ConfigError(f"{flag}={path} is not JSON: {e}") from None


def read_vqav2(
    path: str, *, annotations: str, image_pattern: str = IMAGE_PATTERN
) -> Iterator[dict]:
    """Questions joined with their annotations, in the questions file's order."""
    qs = _load_json(path, "--input")
    anns = _load_json(annotations, "--annotations")
    subtype = qs.get("data_subtype") or anns.get("data_subtype") or "train2014"
    by_q = {a["question_id"]: a for a in anns.get("annotations", [])}
    for q in qs.get("questions", []):
        a = by_q.get(q["question_id"], {})
        yield {
            "key": str(q["question_id"]),
            "question_id": q["question_id"],
            "image": image_pattern.format(subtype=subtype, image_id=q["image_id"]),
            "question": q["question"],
            "answers": a.get("answers", []),
            "multiple_choice_answer": a.get("multiple_choice_answer"),
        }


def select_answer(rec: dict, ctx: Context) -> Iterator[dict]:
    """A.2: keeps the max-confidence answer; counts questions whose choice differs from the
    official `multiple_choice_answer` (`differs_from_official`)."""
    ans = max_confidence_answer(rec["answers"], rec.get("multiple_choice_answer"))
    if ans != rec.get("multiple_choice_answer"):
        ctx.count("differs_from_official")
    yield {k: rec[k] for k in ("image", "question", "question_id")} | {"answer": ans}


def add_arguments(p) -> None:
    p.add_argument("--annotations", required=True, help="v2_mscoco_*_annotations.json")
    p.add_argument("--image_root", required=True, help="directory holding <subtype>/COCO_*.jpg")
    p.add_argument("--image_pattern", default=IMAGE_PATTERN, help="image path under image_root")
    p.add_argument("--name", default="vqav2", help="the merged output's name (NAME.jsonl)")


def run(args, pipeline_args) -> dict:
    reader = functools.partial(
        read_vqav2, annotations=args.annotations, image_pattern=args.image_pattern
    )
    return runner.run(
        [Step("answer", select_answer)],
        args.input,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        reader=reader,
        output_name=args.name,
        mixture={args.name: {"task": "vqa", "image_root": fileio.absolute(args.image_root)}},
    )
