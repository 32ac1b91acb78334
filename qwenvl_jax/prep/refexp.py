"""A.3 referring datasets: RefCOCO / RefCOCO+ / RefCOCOg and Visual Genome regions as
`<ref>expression</ref><box>(x1,y1),(x2,y2)</box>` samples, boxes on the grid of the ORIGINAL image.

  python -m qwenvl_jax.prep refexp --format=refcoco --input=refcoco/refs(unc).p
      --instances=refcoco/instances.json --image_root=/data/coco/train2014 --output=out/refcoco
  python -m qwenvl_jax.prep refexp --format=vg --input=region_descriptions.json
      --image_data=image_data.json --image_root=/data/vg --output=out/vg

RefCOCO family (github.com/lichengunc/refer): `refs(<split_by>).p` (a pickle of plain lists and
dicts, read with a loader that refuses anything else) or the same list as `.json`, and the COCO
`instances.json` that gives each annotation's `bbox` (x, y, w, h pixels) and each image's
`file_name`, `width`, `height`; one sample per sentence, `--split` picks train / val / testA ...
Visual Genome: `region_descriptions.json` (`x`, `y`, `width`, `height`, `phrase` per region) with
`image_data.json` (each image's `width`, `height` and `url`, whose last two parts are the local path
`VG_100K[_2]/<id>.jpg`). Every box goes through `boxes.grid_box` against the size the annotation
was made for, and that size is checked against the image file's header under --image_root
(`boxes.check_size`): a resized copy is refused, never rescaled. A bad box or size drops the sample
with its reason counted (or stops the run naming the sample with --strict). Output lines are the
trainer's `ref_grounding` / `grounded_caption` records with `box_format` xyxy_1000
(`{"image", "expression", "boxes", "width", "height", "text"}`, `text` = `grounding.ref_text`).
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import posixpath
from collections.abc import Iterator

from qwenvl_jax import fileio, grounding
from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.prep import boxes, runner
from qwenvl_jax.prep.steps import Context, Drop, Step

HELP = "A.3: RefCOCO/+/g and Visual Genome -> <ref>..</ref><box>..</box> samples"


class _PlainUnpickler(pickle.Unpickler):
    """refs(*.p) holds only lists, dicts, strings and numbers: any class is refused, so a
    tampered file cannot run code."""

    def find_class(self, module, name):
        raise ConfigError(f"refs pickle refers to {module}.{name}; only plain data is accepted")


def _load(path: str, flag: str):
    try:
        data = fileio.read_bytes(path)
    except FileNotFoundError:
        raise MissingPathError(f"{flag}={path}: file not found") from None
    if path.endswith(".p") or path.endswith(".pkl"):
        try:
            return _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ConfigError(f"{flag}={path}: not a readable pickle ({e})") from None
    try:
        return json.loads(data)
    except ValueError as e:
        raise ConfigError(f"{flag}={path} is not JSON: {e}") from None


def read_refcoco(path: str, *, instances: str, split: str | None) -> Iterator[dict]:
    """One record per (ref, sentence) of `split` (None: all)."""
    inst = _load(instances, "--instances")
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    for ref in _load(path, "--input"):
        if split and ref.get("split") != split:
            continue
        ann = anns.get(ref["ann_id"])
        im = images.get(ref["image_id"])
        if ann is None or im is None:
            raise ConfigError(f"--input={path}: ref {ref.get('ref_id')} names an annotation or"
                              f" image missing from --instances={instances}")  # fmt: skip
        for k, sent in enumerate(ref.get("sentences", [])):
            yield {
                "key": f"{ref.get('ref_id')}_{k}",
                "image": im["file_name"],
                "expression": sent.get("sent") or sent.get("raw", ""),
                "pixel_boxes": [ann["bbox"]],
                "box_fmt": "xywh",
                "size": [im["width"], im["height"]],
            }


def read_vg(path: str, *, image_data: str) -> Iterator[dict]:
    """One record per Visual Genome region."""
    meta = {im.get("image_id", im.get("id")): im for im in _load(image_data, "--image_data")}
    for entry in _load(path, "--input"):
        for reg in entry.get("regions", []):
            im = meta.get(reg.get("image_id", entry.get("id")))
            if im is None:
                raise ConfigError(f"--input={path}: region {reg.get('region_id')} has an image"
                                  f" missing from --image_data={image_data}")  # fmt: skip
            url = im.get("url") or f"VG_100K/{im.get('image_id')}.jpg"
            rel = "/".join(url.rstrip("/").split("/")[-2:])
            yield {
                "key": str(reg.get("region_id")),
                "image": rel,
                "expression": reg.get("phrase", ""),
                "pixel_boxes": [[reg["x"], reg["y"], reg["width"], reg["height"]]],
                "box_fmt": "xywh",
                "size": [im["width"], im["height"]],
            }


@functools.lru_cache(maxsize=4096)
def _file_size(path: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with fileio.path(path).open("rb") as f, Image.open(f) as im:
            return im.size
    except FileNotFoundError:
        return None


def to_sample(rec: dict, ctx: Context, *, image_root: str, strict: bool) -> Iterator[dict]:
    """Validated boxes on the grid of the annotated image; the trainer's record."""
    sample = f"{ctx.shard}/{rec['key']} ({rec['image']})"
    expr = " ".join(str(rec.get("expression", "")).split())
    try:
        if not expr:
            raise boxes.BoxError("no_text", f"{sample}: empty expression")
        actual = _file_size(posixpath.join(image_root, rec["image"]))
        if actual is None:
            raise boxes.BoxError("image_missing", f"{sample}: image not found under {image_root}")
        w, h = rec["size"]
        boxes.check_size((w, h), actual, sample)
        grid = [boxes.grid_box(b, w, h, fmt=rec["box_fmt"], sample=sample)
                for b in rec["pixel_boxes"]]  # fmt: skip
    except boxes.BoxError as e:
        if strict:
            raise
        ctx.example(e.reason, str(e))  # the report names the first sample dropped for it
        raise Drop(e.reason) from None
    yield {
        "image": rec["image"],
        "key": rec["key"],
        "expression": expr,
        "boxes": [list(g) for g in grid],
        "width": w,
        "height": h,
        "text": grounding.ref_text(expr, grid),
    }


def add_arguments(p) -> None:
    p.add_argument("--format", required=True, choices=("refcoco", "vg"))
    p.add_argument("--image_root", required=True, help="the directory the image paths are under")
    p.add_argument("--instances", default=None, help="refcoco: COCO instances.json")
    p.add_argument("--split", default="train", help="refcoco: the refs' split ('' for all)")
    p.add_argument("--image_data", default=None, help="vg: image_data.json")
    p.add_argument("--strict", action="store_true", help="stop at the first bad box or size")
    p.add_argument("--name", default="refexp", help="the merged output's name (NAME.jsonl)")


def run(args, pipeline_args) -> dict:
    if args.format == "refcoco":
        if not args.instances:
            raise ConfigError("--format=refcoco needs --instances=instances.json")
        reader = functools.partial(read_refcoco, instances=args.instances, split=args.split or None)
    else:
        if not args.image_data:
            raise ConfigError("--format=vg needs --image_data=image_data.json")
        reader = functools.partial(read_vg, image_data=args.image_data)
    if not fileio.isdir(args.image_root):
        raise MissingPathError(f"--image_root={args.image_root} is not a directory")
    root = fileio.absolute(args.image_root)
    step = functools.partial(to_sample, image_root=root, strict=args.strict)
    entry = {"box_format": "xyxy_1000", "image_root": root}
    return runner.run(
        [Step("boxes", step)],
        args.input,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        reader=reader,
        output_name=args.name,
        mixture={
            "ref_grounding": dict(entry, task="ref_grounding"),
            "grounded_caption": dict(entry, task="grounded_caption"),
        },
    )
