"""Throughput of the A.1 steps on this machine: pairs per CPU-second (= pairs/s on one core).

  python -m qwenvl_jax.prep.bench [--pairs=2000] [--out=/tmp/prep_bench]

Writes an img2dataset-style shard of synthetic pairs (JPEG photos-like noise, LAION-like caption
mix: clean, HTML, URLs, non-Latin, emoji, long), then times each step alone on the records the
step before it kept, and the whole shard end to end (read tar, every step, write JSON lines and
images). CPU time of this process, so other load on the machine does not count. The CLIP score is
not included (it is a model: its cost is the scorer's images/s on the accelerator, docs/prep.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time

import numpy as np
from PIL import Image

from qwenvl_jax.prep import pairs, runner, shards
from qwenvl_jax.prep.steps import Context, run_steps

TEXTS = [
    "a dog running on the beach at sunset",
    "<p>Modern <b>living room</b> with a grey sofa &amp; plants</p>",
    "Red sports car http://example.com/cars/123.jpg IMG_20230101",
    "一只猫坐在窗台上看着外面的雨",
    "собака на траве",
    "happy birthday \U0001f382\U0001f389",
    "Stock photo 1234567890 - mountain lake reflection in autumn",
    "ok",
    "A detailed view of " + "an old wooden house with a red roof, " * 20,
    "Beautiful wedding dress, lace sleeves, size 8 | Shop now!!!!",
]


def make_shard(path: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            w, h = int(rng.integers(160, 640)), int(rng.integers(160, 640))
            small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=85)
            key = f"{i:09d}"
            meta = {"key": key, "url": f"http://example.com/{key}.jpg", "clip_score": 0.3}
            for name, data in (
                (f"{key}.jpg", buf.getvalue()),
                (f"{key}.txt", TEXTS[i % len(TEXTS)].encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--out", default="/tmp/prep_bench")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    shard = os.path.join(args.out, "00000.tar")
    make_shard(shard, args.pairs)
    cfg = pairs.load_config()
    all_steps = pairs.build_steps(cfg, "laion_en")
    t = time.process_time()
    recs = list(shards.read_tar(shard))
    rows = [("read_tar", len(recs), time.process_time() - t)]
    for step in all_steps:
        ctx = Context("00000", 0)
        inp = [dict(r) for r in recs]
        t = time.process_time()
        recs = list(run_steps([step], iter(inp), ctx))
        rows.append((step.name, len(inp), time.process_time() - t))
    # The scorer's CPU side: decode, resize the shorter side to 224, centre-crop, normalise (what
    # open_clip's transform does before the model), on the pairs that reach the CLIP step.
    t = time.process_time()
    for r in recs:
        with Image.open(io.BytesIO(r["image"])) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 224 / min(w, h)
            im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BICUBIC)
            left, top = (im.width - 224) // 2, (im.height - 224) // 2
            x = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
            _ = (x - 0.45) / 0.27
    rows.append(("clip_preproc", len(recs), time.process_time() - t))
    out_dir = os.path.join(args.out, "out")
    t = time.process_time()
    report = runner.run(all_steps, [shard], out_dir)
    rows.append(("end_to_end", report["records_in"], time.process_time() - t))
    print(f"{'step':<14}{'pairs in':>10}{'cpu s':>10}{'pairs/s/core':>14}")
    for name, n, s in rows:
        print(f"{name:<14}{n:>10}{s:>10.3f}{(n / s if s > 0 else float('inf')):>14.0f}")
    print("removed:", json.dumps(report["removed"]))


if __name__ == "__main__":
    main()
