"""Data pipeline benchmark: packed sequences/s and images/s per worker, host cores per chip, and
the real-token fraction of the rows per task at a stage config's packing settings.

    python -m qwenvl_jax.data.bench [--seq_len 2048 --image_size 448 --batches 6 --workers 0]
    python -m qwenvl_jax.data.bench --config=configs/multitask.py [--max_images=4 --mixing=sample]

Generates JPEGs (noise plus gradients, so they compress like photos rather than flat colour) and a
data set in the official fine-tuning JSON format and as pre-training records, then times the real
pipeline (`make_train_iterator`: tokenize, pack, decode, resize, normalise, batch) in one process.
The result is per worker because grain workers are separate processes, each running that same loop.

Without `--config` the mix is captions, VQA, referring grounding, OCR, multi-turn chat and pure text
(sample mixing). With `--config=<stage config>[:variant]` (any stage, `:tiny` too) the rows are
packed exactly as that stage trains: its `data.seq_len`, `data.max_images`, its model's image span
(`n_queries` + 2 positions per image) and its data's mixing; the data is the config's own
(`data.train` / `data.mixture` in the file, or `--mixture=file.json`) when it names some, else
synthetic records of the stage's recipe (multitask: configs/data/multitask_mixture.json's seven
Table 3 tasks, weights and per-task packing; pretrain: captions; sft: chat), with the lengths of
the public data (`LENGTHS`). It prints the real (non-padding) token fraction and images per row
per task; `--max_images`, `--seq_len`, `--mixing`, `--pack=false` change one setting for an A/B.
`--train_steps=N` also times N train steps of the config's model on these packed rows and on the
same samples one per row, and prints real tokens/s of both (use a `:tiny` config on a CPU).

Host cores needed to feed one accelerator = what one training step consumes at the given step
time (default: the published PyTorch code's 0.466 s/step for batch 4 x 2048 tokens with one image
per sequence, on one H200; see docs/performance.md), divided by one worker's rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import zlib

import numpy as np
from PIL import Image

from qwenvl_jax import image as image_lib
from qwenvl_jax.data import batch as batch_lib
from qwenvl_jax.data import images as images_lib
from qwenvl_jax.data import pipeline
from qwenvl_jax.train import inputs, stage_config

WORDS = (
    "the a red blue small large dog cat car tree house street sign person table window sky "
    "water road left right near behind under over holds looks stands sits next to with and"
).split()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n)).capitalize() + "."


def make_images(out_dir: str, n: int, size: int, seed: int = 0) -> list[str]:
    """`n` JPEGs of size x size (quality 90) under out_dir/imgs; returns relative paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "imgs"), exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        base = np.stack([yy * rng.uniform(50, 255), xx * rng.uniform(50, 255), (xx + yy) * 90], -1)
        noise = rng.normal(0, 25, (size, size, 3))
        a = np.clip(base + noise, 0, 255).astype(np.uint8)
        rel = f"imgs/{i}.jpg"
        Image.fromarray(a).save(os.path.join(out_dir, rel), "JPEG", quality=90)
        paths.append(rel)
    return paths


def make_mix(out_dir: str, paths: list[str], n: int, seed: int = 0) -> dict:
    """Writes a realistic mix of sources; returns {name: (file, task, weight)}."""
    rng = np.random.default_rng(seed)

    def img():
        return str(rng.choice(paths))

    def box():
        x1, y1 = rng.integers(0, 300, 2)
        return [int(x1), int(y1), int(x1 + rng.integers(20, 140)), int(y1 + rng.integers(20, 140))]

    srcs = {
        "caption": ("caption", 0.3, lambda: {"image": img(), "caption": _sentence(rng, 12)}),
        "vqa": (
            "vqa",
            0.15,
            lambda: {
                "image": img(),
                "question": _sentence(rng, 9)[:-1] + "?",
                "answer": _sentence(rng, 3),
            },
        ),
        "ref_grounding": (
            "ref_grounding",
            0.15,
            lambda: {
                "image": img(),
                "expression": _sentence(rng, 5),
                "boxes": [box()],
                "width": 448,
                "height": 448,
            },
        ),
        "ocr": (
            "ocr",
            0.1,
            lambda: {
                "image": img(),
                "width": 448,
                "height": 448,
                "lines": [
                    {"text": _sentence(rng, 4), "box": box()} for _ in range(rng.integers(2, 8))
                ],
            },
        ),
        "text": ("text", 0.1, lambda: {"text": " ".join(_sentence(rng, 15) for _ in range(40))}),
    }
    out = {}
    for name, (task, weight, make) in srcs.items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            for _ in range(n):
                f.write(json.dumps(make()) + "\n")
        out[name] = (path, task, weight)
    chats = []
    for i in range(n):
        turns = [
            {"from": "user", "value": f"Picture 1: <img>{img()}</img>\n" + _sentence(rng, 10)},
            {"from": "assistant", "value": " ".join(_sentence(rng, 12) for _ in range(4))},
        ]
        for _ in range(int(rng.integers(0, 3))):
            turns += [
                {"from": "user", "value": _sentence(rng, 8)},
                {"from": "assistant", "value": " ".join(_sentence(rng, 12) for _ in range(3))},
            ]
        chats.append({"id": f"chat{i}", "conversations": turns})
    path = os.path.join(out_dir, "chat.json")
    with open(path, "w") as f:
        json.dump(chats, f)
    out["chat"] = (path, "chatml", 0.2)
    return out


# Words (or items) per record, uniform in [lo, hi]: roughly the public data's lengths (COCO and
# LAION captions ~10 words, VQAv2/GQA questions ~6-10 words with 1-3 word answers, RefCOCO
# expressions ~3-8 words, GRIT captions ~10-20 words with 1-3 grounded phrases, SynthDoG pages
# of a few lines, pure-text documents from a sentence to longer than a row).
LENGTHS = {
    "caption_words": (6, 18),
    "question_words": (4, 12),
    "answer_words": (1, 3),
    "expression_words": (2, 8),
    "grit_words": (10, 20),
    "grit_refs": (1, 3),
    "ocr_lines": (2, 8),
    "ocr_line_words": (2, 8),
    "text_sentences": (2, 150),
    "chat_extra_turns": (0, 2),
}


def _n(rng: np.random.Generator, key: str) -> int:
    lo, hi = LENGTHS[key]
    return int(rng.integers(lo, hi + 1))


def task_record(task: str, rng: np.random.Generator, image: str, side: int) -> dict:
    """One synthetic record of `task` (a `tasks.TASKS` name) in the layout its source reads
    (configs/data/README.md), boxes in pixels of a `side` x `side` image."""

    def box():
        x1, y1 = (int(v) for v in rng.integers(0, side * 2 // 3, 2))
        w, h = (int(v) for v in rng.integers(side // 20 + 1, side // 3, 2))
        return [x1, y1, min(x1 + w, side), min(y1 + h, side)]

    if task == "caption":
        return {"image": image, "caption": _sentence(rng, _n(rng, "caption_words"))}
    if task == "vqa":
        q = _sentence(rng, _n(rng, "question_words"))[:-1] + "?"
        return {"image": image, "question": q, "answer": _sentence(rng, _n(rng, "answer_words"))}
    if task in ("ref_grounding", "grounded_caption"):
        expr = _sentence(rng, _n(rng, "expression_words"))[:-1]
        return {"image": image, "expression": expr, "boxes": [box()], "width": side, "height": side}
    if task == "grounding":
        words = list(rng.choice(WORDS, size=_n(rng, "grit_words")))
        refs, text = [], ""
        spans = sorted(rng.choice(len(words) // 2, size=_n(rng, "grit_refs"), replace=False))
        for i, w in enumerate(words):
            start = len(text) + (1 if text else 0)
            text += (" " if text else "") + w
            if i % 2 == 0 and i // 2 in spans:
                refs.append({"span": [start, len(text)], "boxes": [box()]})
        return {"image": image, "caption": text, "refs": refs, "width": side, "height": side}
    if task == "ocr":
        lines = [
            {"text": _sentence(rng, _n(rng, "ocr_line_words")), "box": box()}
            for _ in range(_n(rng, "ocr_lines"))
        ]
        return {"image": image, "lines": lines, "width": side, "height": side}
    if task == "text":
        n = _n(rng, "text_sentences")
        return {"text": " ".join(_sentence(rng, int(rng.integers(8, 21))) for _ in range(n))}
    if task == "chatml":
        turns = [
            {"from": "user", "value": f"Picture 1: <img>{image}</img>\n" + _sentence(rng, 10)},
            {"from": "assistant", "value": " ".join(_sentence(rng, 12) for _ in range(4))},
        ]
        for _ in range(_n(rng, "chat_extra_turns")):
            turns += [
                {"from": "user", "value": _sentence(rng, 8)},
                {"from": "assistant", "value": " ".join(_sentence(rng, 12) for _ in range(3))},
            ]
        return {"conversations": turns}
    raise ValueError(f"no synthetic records for task {task!r}")


def write_task_file(out_dir: str, name: str, task: str, paths, n: int, side: int, seed=0) -> str:
    """`n` records of `task` as JSON lines in out_dir/<name>.jsonl; returns the path."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(task_record(task, rng, str(rng.choice(paths)), side)) + "\n")
    return path


def stage_recipe(stage: str) -> tuple[dict, dict]:
    """({source name: (task, weight)}, other data keys) of a stage's data when the config names
    none: multitask = the shipped mixture file's tasks, weights and mixing; pretrain = captions;
    sft = chat."""
    if stage == "multitask":
        with open(os.path.join(stage_config.CONFIGS_DIR, "data", "multitask_mixture.json")) as f:
            raw = json.load(f)
        srcs = {n: (e["task"], float(e["weight"])) for n, e in raw["sources"].items()}
        rest = {k: v for k, v in raw.items() if k not in ("sources", "comment")}
        return srcs, rest
    if stage == "pretrain":
        return {"caption": ("caption", 1.0)}, {}
    return {"chat": ("chatml", 1.0)}, {}


def config_data(args, cfg, work: str) -> tuple[object, str]:
    """The pipeline config the bench packs for `cfg`, and where it came from."""
    kind, spec = inputs.train_spec(cfg)
    if spec is not None:
        return pipeline.resolve_data_config(spec), "the config's data"
    side = int(args.source_size or max(int(cfg.data.image_size), 64))
    paths = make_images(work, args.num_images, side)
    srcs, rest = stage_recipe(str(cfg.stage))
    spec = pipeline.default_data_config()
    for k, v in rest.items():
        spec[k] = v
    for name, (task, weight) in srcs.items():
        path = write_task_file(work, name, task, paths, args.num_records, side)
        spec.sources[name] = pipeline.source_config(path=path, task=task, weight=weight)
    return spec, f"synthetic records of the {cfg.stage or 'stage'} recipe in {work}"


def _iterator(spec, tok, cfg, batch_rows: int, workers: int):
    return pipeline.make_train_iterator(
        spec,
        tok,
        seq_len=int(cfg.data.seq_len),
        batch_size_per_host=batch_rows,
        image_size=int(cfg.data.image_size),
        max_images=int(cfg.data.max_images),
        seed=0,
        worker_count=workers,
    )


def run_config(args: argparse.Namespace) -> dict:
    """`--config` mode: the real-token fraction per task at the config's packing settings."""
    from qwenvl_jax.tokenizer import load_tokenizer
    from qwenvl_jax.train.state import model_config

    cfg = stage_config.load(args.config)
    if args.mixture:
        cfg.data.train, cfg.data.mixture = "", args.mixture
    for key in ("seq_len", "max_images"):
        if getattr(args, key) is not None:
            cfg.data[key] = getattr(args, key)
    n_queries = int(model_config(cfg).visual.n_queries)
    tok = load_tokenizer(cfg.data.tokenizer or None, image_span=n_queries)
    work = args.workdir or tempfile.mkdtemp(prefix="qwenvl_data_bench_")
    spec, where = config_data(args, cfg, work)
    if args.mixing:
        spec.mixing = args.mixing
    if args.pack is not None:
        spec.pack = args.pack == "true"
    spec.prefetch = 1
    t, m = int(cfg.data.seq_len), int(cfg.data.max_images)
    print(
        f"{args.config}: {t}-token rows, {m} image slots, {n_queries + 2} positions per image,"
        f" mixing={spec.mixing}, pack={spec.get('pack', True)}; data: {where}"
    )
    batches = []
    t0 = time.perf_counter()
    with _iterator(spec, tok, cfg, args.batch_rows, args.workers) as it:
        for _ in range(args.batches):
            b = next(it)
            batches.append(batch_lib.real_work(b))
        dt = time.perf_counter() - t0
        per_task = it.source_rows()
        metrics = it.metrics()
    rows = args.batches * args.batch_rows
    real = sum(w["tokens"] for w in batches)
    images = sum(w["images"] for w in batches)
    print(f"\n{'task':<18}{'rows':>6}{'real tokens':>13}{'images/row':>12}")
    for name, r in per_task.items():
        fraction, per_row = r["real_fraction"], r["images_per_row"]
        print(f"{name:<18}{r['rows']:>6.0f}{fraction:>13.3f}{per_row:>12.2f}")
    overall = real / (rows * t)
    print(f"{'all rows':<18}{rows:>6}{overall:>13.3f}{images / rows:>12.2f}")
    skipped = metrics["data/skipped"]
    print(f"({rows} rows in {dt:.1f} s, 1 process; skipped records: {skipped:.0f})")
    res = {
        "config": args.config,
        "seq_len": t,
        "max_images": m,
        "mixing": str(spec.mixing),
        "real_fraction": overall,
        "images_per_row": images / rows,
        "per_task": per_task,
    }
    if args.train_steps:
        res["train"] = time_train_steps(args, cfg, spec, tok)
    return res


def time_train_steps(args, cfg, spec, tok) -> dict:
    """Real tokens/s of the config's train step on packed rows and on the same samples one per
    row (`pack=False`), steps interleaved so both see the same machine load."""
    import jax

    from qwenvl_jax import train

    cfg = cfg.copy_and_resolve_references()
    cfg.data.kind = "random"  # the step's setup only; the rows come from the pipeline here
    cfg.data.train = cfg.data.mixture = ""
    cfg.data.spec = pipeline.default_data_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model = 1, -1, 1
    s = train.build(cfg, jax.devices()[:1])
    params = train.init_params(s, 0)
    opt = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
    step = train.make_train_step(s)
    rows = int(cfg.batch_size)
    modes = {"packed": True, "one per row": False}
    feeds = {}
    for label, pack in modes.items():
        sp = spec.copy_and_resolve_references()
        sp.pack = pack
        it = _iterator(sp, tok, cfg, rows, 0)
        feeds[label] = [next(it) for _ in range(args.train_steps + 1)]
        it.close()
    out = {label: {"seconds": 0.0, "tokens": 0} for label in modes}
    for label in modes:  # compile (same shapes: once) and warm up
        params, opt, mt = step(params, opt, train.to_step_batch(feeds[label][0], s))
        jax.block_until_ready(mt)
    for i in range(1, args.train_steps + 1):
        for label in modes:
            local = feeds[label][i]
            batch = train.to_step_batch(local, s)
            t0 = time.perf_counter()
            params, opt, mt = step(params, opt, batch)
            jax.block_until_ready(mt)
            out[label]["seconds"] += time.perf_counter() - t0
            out[label]["tokens"] += batch_lib.real_work(local)["tokens"]
    print(f"\ntrain steps ({args.train_steps} each, {rows} rows x {cfg.data.seq_len}, 1 device):")
    for label, r in out.items():
        r["step_s"] = r["seconds"] / args.train_steps
        r["real_tokens_per_s"] = r["tokens"] / r["seconds"]
        print(
            f"  {label:<12} {r['step_s']:.3f} s/step, {r['real_tokens_per_s']:,.0f} real"
            f" tokens/s ({r['tokens'] / (args.train_steps * rows):.0f} real tokens per row)"
        )
    ratio = out["packed"]["real_tokens_per_s"] / out["one per row"]["real_tokens_per_s"]
    out["ratio"] = ratio
    print(f"  packed / one per row: {ratio:.2f}x real tokens/s")
    return out


def run(args: argparse.Namespace) -> dict:
    from qwenvl_jax.tokenizer import QWenTokenizer

    tok = QWenTokenizer()
    work = args.workdir or tempfile.mkdtemp(prefix="qwenvl_data_bench_")
    t0 = time.perf_counter()
    paths = make_images(work, args.num_images, args.source_size)
    mix = make_mix(work, paths, args.num_records)
    print(
        f"generated {len(paths)} {args.source_size}-px JPEGs and {len(mix)} sources in {work}"
        f" ({time.perf_counter() - t0:.1f} s)"
    )
    cfg = pipeline.default_data_config()
    for name, (path, task, weight) in mix.items():
        cfg.sources[name] = pipeline.source_config(path=path, task=task, weight=weight)
    cfg.prefetch = 1
    it = pipeline.make_train_iterator(
        cfg,
        tok,
        seq_len=args.seq_len,
        batch_size_per_host=args.batch_rows,
        image_size=args.image_size,
        max_images=args.max_images,
        seed=0,
        worker_count=args.workers,
    )
    with it:
        next(it)  # warm-up: start-up, first fills
        n_rows = n_img = 0
        t = time.perf_counter()
        for _ in range(args.batches):
            b = next(it)
            n_rows += b["input_ids"].shape[0]
            n_img += int(b["image_valid"].sum())
        dt = time.perf_counter() - t
        metrics = it.metrics()
    workers = max(1, args.workers)
    seq_rate = n_rows / dt / workers
    img_rate = n_img / dt / workers
    need_seq = args.ref_batch_rows / args.step_time
    need_img = need_seq * args.ref_images_per_seq
    img_per_row = n_img / n_rows
    res = {
        "seq_per_s_per_worker": seq_rate,
        "images_per_s_per_worker": img_rate,
        "images_per_row": img_per_row,
        "packing_efficiency": metrics["data/packing_efficiency"],
        "cores_this_mix": need_seq / seq_rate if seq_rate else math.inf,
    }
    # The reference workload has ref_images_per_seq images per row: time one image alone (read,
    # decode, RGB, resize, normalise) and charge the rest of this run's time to the rows' text.
    t = time.perf_counter()
    for rel in paths:
        im, _ = images_lib.decode_image(os.path.join(work, rel))
        image_lib.preprocess(im, args.image_size)
    per_img = (time.perf_counter() - t) / len(paths)
    per_row_text = max(dt * workers - n_img * per_img, 0.0) / n_rows
    ref_row = per_row_text + per_img * args.ref_images_per_seq
    res.update(
        seconds_per_image=per_img,
        seconds_per_row_text=per_row_text,
        cores_reference_workload=need_seq * ref_row,
    )
    print(
        f"\nmix: {n_rows} rows x {args.seq_len} tokens, {n_img} images, {args.batches} batches"
        f" in {dt:.2f} s with {args.workers} worker processes"
    )
    print(f"packed sequences/s per worker: {seq_rate:.2f}")
    print(f"images/s per worker:           {img_rate:.2f}  ({img_per_row:.2f} images per row)")
    print(f"packing efficiency:            {res['packing_efficiency']:.3f} (real / all tokens)")
    print(f"skipped samples:               {metrics['data/skipped']:.0f}")
    print(
        f"\nto feed one accelerator at {args.step_time} s/step x {args.ref_batch_rows} rows"
        f" ({need_seq:.2f} rows/s):"
    )
    print(f"  this mix ({img_per_row:.2f} images/row):  {res['cores_this_mix']:.2f} host cores")
    print(
        f"  reference workload ({args.ref_images_per_seq} image/row, {need_img:.2f} images/s):"
        f" {res['cores_reference_workload']:.2f} host cores"
    )
    print(
        f"  (one image: {per_img * 1e3:.1f} ms; tokenize + pack: {per_row_text * 1e3:.1f} ms/row)"
    )
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="", help="a stage config (configs/multitask.py[:tiny])")
    p.add_argument("--seq_len", type=int, default=None, help="default 2048 (or the config's)")
    p.add_argument("--image_size", type=int, default=448)
    p.add_argument("--max_images", type=int, default=None, help="default 8 (or the config's)")
    p.add_argument("--mixture", default="", help="--config: a mixture file (data.mixture)")
    p.add_argument("--mixing", choices=("sample", "sequence"), default=None)
    p.add_argument("--pack", choices=("true", "false"), default=None, help="false: 1 per row")
    p.add_argument("--batch_rows", type=int, default=4, help="rows per batch in the benchmark")
    p.add_argument("--batches", type=int, default=None, help="default 6 (--config: 60)")
    p.add_argument("--train_steps", type=int, default=0, help="--config: time train steps too")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: in-process)")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--source_size", type=int, default=0, help="side of the generated JPEGs")
    p.add_argument("--num_records", type=int, default=400, help="records per source")
    p.add_argument("--workdir", default="", help="where to write the generated data")
    p.add_argument("--step_time", type=float, default=0.466, help="accelerator s/step to feed")
    p.add_argument("--ref_batch_rows", type=int, default=4, help="rows per accelerator step")
    p.add_argument("--ref_images_per_seq", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.config:
        args.batches = args.batches or 60
        return run_config(args)
    args.seq_len = args.seq_len or 2048
    args.max_images = args.max_images or 8
    args.batches = args.batches or 6
    args.source_size = args.source_size or 448
    return run(args)


if __name__ == "__main__":
    main()
