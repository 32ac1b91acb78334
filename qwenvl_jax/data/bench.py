"""Data pipeline benchmark: packed sequences/s and images/s per worker, and host cores per chip.

    python -m qwenvl_jax.data.bench [--seq_len 2048 --image_size 448 --batches 6 --workers 0]

Generates 448-px JPEGs (noise plus gradients, so they compress like photos rather than flat
colour) and a mixed data set in the official fine-tuning JSON format and as pre-training records
(captions, VQA, referring grounding, OCR, multi-turn chat, pure text), then times the real pipeline
(`make_train_iterator`: tokenize, pack, decode, resize, normalise, batch) in one process. The
result is per worker because grain workers are separate processes, each running that same loop.

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

import numpy as np
from PIL import Image

from qwenvl_jax import image as image_lib
from qwenvl_jax.data import images as images_lib
from qwenvl_jax.data import pipeline

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
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--image_size", type=int, default=448)
    p.add_argument("--max_images", type=int, default=8)
    p.add_argument("--batch_rows", type=int, default=4, help="rows per batch in the benchmark")
    p.add_argument("--batches", type=int, default=6, help="timed batches (after one warm-up)")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: in-process)")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--source_size", type=int, default=448, help="side of the generated JPEGs")
    p.add_argument("--num_records", type=int, default=400, help="records per source")
    p.add_argument("--workdir", default="", help="where to write the generated data")
    p.add_argument("--step_time", type=float, default=0.466, help="accelerator s/step to feed")
    p.add_argument("--ref_batch_rows", type=int, default=4, help="rows per accelerator step")
    p.add_argument("--ref_images_per_seq", type=float, default=1.0)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
