"""The training input pipeline: sources -> mixture -> host shard -> packing -> images -> batches.

The trainer calls `make_train_iterator` once per host and gets a `DataIterator` that yields exactly
the batch dict of docs/architecture.md ("Batches"), with `get_state` / `set_state` for the training
checkpoint and `metrics()` for the logs (skip counters per source and reason, packing efficiency).

The data config (`default_data_config()`, an ml_collections ConfigDict):

    data.sources.<name>:        one entry per named source
        kind:        "json" (official fine-tuning JSON list / JSON lines) or "tfds"
        path:        json: the file (local or gs://)
        name, split, data_dir:  tfds: dataset name (with version), split, data directory
        task:        caption | vqa | grounding | ref_grounding | grounded_caption | ocr | text |
                     chatml
        weight:      mixture weight (relative; normalised over sources)
        fields:      {canonical field: record key}, e.g. {"boxes": "objects.bbox"} (dotted, [i])
        box_format:  xyxy_pixel | xywh_pixel | xyxy_norm | yxyx_norm | xyxy_1000
        image_root:  directory for relative image paths (json default: the file's directory)
        options:     tasks.TaskOptions overrides (prompts, system_message)
    data.mixing:        "sample" (mix records, then pack; weights are fractions of samples) or
                        "sequence" (pack each source separately, then mix packed rows; weights
                        are fractions of rows: the paper packs same-task data together).
                        `multitask_config()` builds Table 3's seven-task mixture this way.
    data.weight_by_records: True: each source's weight is multiplied by its record count, so
                        every record is equally likely (`--config.data.train` files)
    data.strict:        False: skip, log and count bad records/images; True: stop with DataError
    data.too_long:      "truncate" (cut at a safe place) or "drop"
    data.num_open_rows: rows filled at once by the first-fit packer
    data.pack:          False: one sample per row (no packing; the published finetune.py's rows)
    data.shuffle:       shuffle each source per epoch
    data.num_epochs:    None = repeat forever
    data.min_image_side: images with a shorter side (pixels) are skipped as too small
    data.prefetch:      batches prefetched per worker (or by a thread when worker_count=0)

Skipped records: `make_train_iterator(max_skip_fraction=, skip_check_records=)` (the trainer's
`data.*` keys of the same names) reads each source's first records at start and stops with one line
when their image paths do not fit the image span, when every one is skipped, or when more than that
fraction is; as images load the same limit holds. A source whose every record is skipped always ends
the stream with `DataError`, never a wait for a batch that cannot come.

Determinism: everything is a function of (config, seed, shard_index, shard_count, worker_count);
restoring the state requires the same values.
"""

from __future__ import annotations

import ast
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from qwenvl_jax import image as image_lib
from qwenvl_jax.data import images as images_lib
from qwenvl_jax.data import packing, sources, tasks
from qwenvl_jax.data.batch import BATCH_KEYS
from qwenvl_jax.errors import ConfigError

# Table 3 of the paper: the multi-task pre-training tasks and their sample counts (millions).
TABLE3_SAMPLES_M = {
    "caption": 19.7,
    "vqa": 3.6,
    "grounding": 3.5,
    "ref_grounding": 8.7,
    "grounded_caption": 8.7,
    "ocr": 24.8,
    "text": 7.8,
}


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with no sources (add entries under `sources`; see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.sources = ml_collections.ConfigDict()
    c.mixing = "sample"
    c.weight_by_records = False
    c.strict = False
    c.too_long = "truncate"
    c.num_open_rows = 8
    c.pack = True
    c.shuffle = True
    c.num_epochs = ml_collections.FieldReference(None, field_type=int)
    c.min_image_side = 8
    c.prefetch = 2
    return c


def multitask_config(**sources_by_task: Mapping) -> ml_collections.ConfigDict:
    """The multi-task stage's data config: one source per Table 3 task, weighted by its sample
    count (19.7M captions, 3.6M VQA, 3.5M grounding, 8.7M referring grounding, 8.7M grounded
    captions, 24.8M OCR, 7.8M pure text), packed per task as section 3.2 describes ("packing the
    same task data into sequences of length 2048").

    Args:
      **sources_by_task: task name -> its source entry (path or TFDS name, fields, box_format...);
        `task` and `weight` are filled in. Tasks left out are left out of the mixture.
    """
    unknown = sorted(set(sources_by_task) - set(TABLE3_SAMPLES_M))
    if unknown:
        raise ValueError(f"unknown Table 3 tasks {unknown}; choose from {sorted(TABLE3_SAMPLES_M)}")
    c = default_data_config()
    c.mixing = "sequence"
    for task, entry in sources_by_task.items():
        kw = dict(_plain(entry))
        kw.update(task=task, weight=TABLE3_SAMPLES_M[task])
        c.sources[task] = source_config(**kw)
    return c


def source_config(**kw: Any) -> ml_collections.ConfigDict:
    """One `sources` entry with the defaults filled in."""
    c = ml_collections.ConfigDict(
        dict(
            kind="json",
            path="",
            name="",
            split="train",
            data_dir="",
            task="chatml",
            weight=1.0,
            fields={},
            box_format="xyxy_pixel",
            image_root="",
            options={},
        )
    )
    c.update(kw)
    return c


def _plain(c: Any) -> Any:
    return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


class LoadImages:
    """Loads a packed row's images into `images` [M, S, S, 3]; a sample whose image fails is
    turned into padding in place (counted under its source; raises in strict mode)."""

    def __init__(self, *, image_size: int, min_side: int, pad_id: int, source_names, strict: bool):
        self.image_size = image_size
        self.min_side = min_side
        self.pad_id = pad_id
        self.src_index = {n: i for i, n in enumerate(source_names)}
        self.strict = strict

    def __call__(self, row: dict) -> dict:
        S = self.image_size
        srcs = row.pop("image_srcs")
        names = row.pop("image_sources")
        seg_of = row.pop("image_segment")
        counts = row["_counts"] = row["_counts"].copy()
        imgs = np.zeros((len(srcs), S, S, 3), np.float32)
        failed: set[int] = set()
        for m, src in enumerate(srcs):
            if src is None or seg_of[m] in failed:
                continue
            sname, index = names[m]
            s = self.src_index[sname]
            try:
                im, converted = images_lib.decode_image(src, self.min_side)
                imgs[m] = image_lib.preprocess(im, S)
                if converted:
                    counts[s, packing.reason_index("image_converted")] += 1
            except tasks.BadSample as e:
                if self.strict:
                    raise sources.DataError(f"source {sname!r} record {index}: {e}") from None
                logging.warning("data: skipped %s[%d] (%s): %s", sname, index, e.reason, e.message)
                row.setdefault("_skip_first", {}).setdefault(s, f"record {index}: {e.message}")
                seg = int(seg_of[m])
                failed.add(seg)
                counts[s, packing.reason_index(e.reason)] += 1
                counts[s, packing.reason_index("samples")] -= 1
                counts[s, packing.reason_index("tokens")] -= int(np.sum(row["segment_ids"] == seg))
                packing.blank_segment(row, seg, self.pad_id, seg_of)
                imgs[seg_of == seg] = 0.0
        row["images"] = imgs
        return row


def resolve_data_config(data_config) -> ml_collections.ConfigDict:
    """`default_data_config()` updated with `data_config` (a ConfigDict or dict; missing keys take
    their defaults). Unknown keys, here or in a source entry, raise ValueError naming them."""
    given = _plain(data_config) or {}
    c = default_data_config()
    unknown = sorted(set(given) - set(c.keys()))
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known: {sorted(c.keys())}")
    srcs = given.get("sources") or {}
    known = set(source_config().keys())
    for name, sc in srcs.items():
        bad = sorted(set(sc) - known)
        if bad:
            raise ValueError(f"data source {name!r}: unknown keys {bad}; known: {sorted(known)}")
    for k, v in given.items():
        if k != "sources":
            c[k] = v
    c.sources = ml_collections.ConfigDict({n: source_config(**sc) for n, sc in srcs.items()})
    return c


def build_sources(data_config, tokenizer) -> list[sources.Source]:
    """The configured sources, in config order."""
    srcs = _plain(data_config.sources)
    if not srcs:
        raise ValueError(
            "data_config.sources is empty: add at least one source (layout in"
            " qwenvl_jax/data/pipeline.py)"
        )
    out = []
    for name, cfg in srcs.items():
        cfg = dict(source_config().to_dict(), **cfg)
        for k in ("data_dir", "image_root", "path", "name"):
            cfg[k] = cfg[k] or None
        out.append(sources.Source(name, cfg, tokenizer, strict=bool(data_config.strict)))
    return out


_PATH_IN_MESSAGE = re.compile(r": ('.*'|\".*\")$")


def _long_path_error(src: sources.Source, skips: list, read: int, span: int) -> ConfigError:
    """The one start-up line for image paths longer than the model's image span."""
    first = skips[0].message
    m = _PATH_IN_MESSAGE.search(first)
    path = ast.literal_eval(m.group(1)) if m else first
    return ConfigError(
        f"{src.label}: {len(skips)} of {read} records have image paths longer than the model's"
        f" {span - 1}-byte image span (first: {path!r}, record {skips[0].index}); the path as"
        " written between <img> and </img> must fit: use shorter paths, relative to the image"
        f" root {src.image_root} (the data file's directory, or image_root in a mixture file), or"
        " a model with more queries (--config.model.overrides.visual.n_queries=256, the"
        " published span)"
    )


def check_sources(srcs: Sequence[sources.Source], limit: packing.SkipLimit, span: int) -> None:
    """The start-up check of each source's first `limit.window` records (read, tokenized, not their
    images): image paths too long for the image span (a configuration problem: one line for the
    source, with the fix), every record skipped, or more than `limit.max_fraction` skipped.

    Raises:
      ConfigError: image paths too long. DataError: too many records skipped (the counts by
      reason and the first message).
    """
    for s, src in enumerate(srcs):
        read = min(len(src), limit.window)
        skips = [el for i in range(read) if isinstance(el := src[i], tasks.Skip)]
        long = [k for k in skips if k.reason == "image_path_too_long"]
        if long:
            raise _long_path_error(src, long, read, span)
        row = np.zeros(len(packing.REASONS), np.int64)
        for k in skips:
            row[packing.reason_index(k.reason)] += 1
        first = f"record {skips[0].index}: {skips[0].message}" if skips else None
        if skips and len(skips) == read:
            raise limit.error(src.name, s, row, first, every=True, read=read)
        if limit.max_fraction is not None and len(skips) > limit.max_fraction * read:
            raise limit.error(src.name, s, row, first, every=False, read=read)


def make_train_dataset(
    data_config,
    tokenizer,
    *,
    seq_len: int,
    batch_size_per_host: int,
    image_size: int,
    max_images: int,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    max_skip_fraction: float | None = None,
    skip_check_records: int | None = None,
) -> grain.IterDataset:
    """The grain IterDataset behind `make_train_iterator` (same arguments); elements are batches
    with the contract's keys plus `_counts` [B, n_sources, n_reasons]."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
    if max_skip_fraction is not None and not (
        skip_check_records is not None and skip_check_records >= 0 and 0 <= max_skip_fraction <= 1
    ):
        raise ConfigError(
            f"--config.data.max_skip_fraction={max_skip_fraction} must be in [0, 1] and"
            f" --config.data.skip_check_records={skip_check_records} >= 0 (0: no limit)"
        )
    if not skip_check_records:
        max_skip_fraction = None
    data_config = resolve_data_config(data_config)
    srcs = build_sources(data_config, tokenizer)
    names = [s.name for s in srcs]
    limit = packing.SkipLimit(
        labels=tuple(s.label for s in srcs),
        sizes=tuple(len(s) for s in srcs),
        max_fraction=max_skip_fraction,
        window=int(skip_check_records or 0),
    )
    if max_skip_fraction is not None:
        check_sources(srcs, limit, tokenizer.image_span)
    weights = [float(_plain(data_config.sources)[n].get("weight", 1.0)) for n in names]
    if data_config.weight_by_records:
        weights = [w * len(s) for w, s in zip(weights, srcs, strict=True)]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
    num_epochs = data_config.num_epochs
    per_source = [
        sources.source_dataset(
            s, seed=_seed(seed, s.name), shuffle=bool(data_config.shuffle), num_epochs=num_epochs
        )
        for s in srcs
    ]
    pack_kw = dict(
        seq_len=seq_len,
        max_images=max_images,
        pad_id=tokenizer.eod_id,
        img_start_id=tokenizer.img_start_id,
        img_end_id=tokenizer.img_end_id,
        n_queries=tokenizer.image_span,
        source_names=names,
        num_open_rows=int(data_config.num_open_rows),
        too_long=str(data_config.too_long),
        skip_limit=limit,
        max_samples=0 if data_config.pack else 1,
    )
    load = LoadImages(
        image_size=image_size,
        min_side=int(data_config.min_image_side),
        pad_id=tokenizer.eod_id,
        source_names=names,
        strict=bool(data_config.strict),
    )
    pack_kw.update(shard_index=shard_index, shard_count=shard_count, row_transform=load)
    if data_config.mixing == "sample":
        ds = packing.PackIterDataset(per_source, weights, **pack_kw)
    elif data_config.mixing == "sequence":
        packed = [packing.PackIterDataset(d, **pack_kw) for d in per_source]
        ds = packed[0] if len(packed) == 1 else grain.IterDataset.mix(packed, weights)
    else:
        raise ValueError(f"data.mixing must be 'sample' or 'sequence', got {data_config.mixing!r}")
    ds = ds.batch(batch_size_per_host, drop_remainder=True)
    prefetch = max(1, int(data_config.prefetch))
    if worker_count > 0:
        # Grain reads absl flags when it starts workers; a program that parses its own arguments
        # (argparse, a notebook) has not parsed them, which would stop the run.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch)
        )
    else:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


class DataIterator:
    """Yields the trainer's batch dicts; checkpointable; accumulates data metrics.

    `get_state()` returns a JSON-serialisable dict (grain's iterator state plus the counters) to
    store in the training checkpoint; `set_state()` restores it (same config, seed, shards and
    workers).
    """

    def __init__(self, ds: grain.IterDataset, source_names: Sequence[str]):
        self._ds = ds
        self._it = iter(ds)
        self.source_names = list(source_names)
        self._counts = np.zeros((len(self.source_names), len(packing.REASONS)), np.int64)
        self._tokens = np.zeros(2, np.int64)  # real (segment > 0) tokens, all tokens
        # Per source, over the rows holding its samples: rows, their real tokens, their images,
        # their positions.
        self._rows = np.zeros((len(self.source_names), 4), np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self._it)
        counts = np.asarray(b.pop("_counts"))  # [B, sources, reasons]
        self._counts += counts.sum(0)
        seg = b["segment_ids"]
        self._tokens += (int(np.count_nonzero(seg)), seg.size)
        held = (counts[:, :, packing.REASON_INDEX["samples"]] > 0).astype(np.int64)  # [B, S]
        real = np.count_nonzero(seg, axis=1)
        imgs = np.count_nonzero(b["image_valid"], axis=1) if "image_valid" in b else 0 * real
        width = np.full_like(real, seg.shape[1])
        self._rows += np.stack([held.sum(0), held.T @ real, held.T @ imgs, held.T @ width], 1)
        return {k: b[k] for k in BATCH_KEYS}

    def close(self) -> None:
        """Stop prefetch threads / worker processes."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_state(self) -> dict:
        return {
            "grain": self._it.get_state(),
            "counts": self._counts.tolist(),
            "tokens": self._tokens.tolist(),
            "rows": self._rows.tolist(),
        }

    def set_state(self, state: Mapping) -> None:
        self._it.set_state(state["grain"])
        self._counts = packing.pad_counts(state["counts"], self._counts.shape)
        self._tokens = np.array(state["tokens"], np.int64)
        if "rows" in state:  # states saved before the per-source rows were kept lack it
            self._rows = np.array(state["rows"], np.int64).reshape(self._rows.shape)

    def counts(self) -> dict[str, dict[str, int]]:
        """{source: {reason: count}} of everything consumed so far (non-zero entries)."""
        return {
            n: {r: int(c) for r, c in zip(packing.REASONS, row, strict=True) if c}
            for n, row in zip(self.source_names, self._counts, strict=True)
        }

    def source_rows(self) -> dict[str, dict[str, float]]:
        """Per source with rows so far, over the rows holding its samples (with per-task packing,
        `mixing="sequence"`, exactly that task's rows): `rows`, `real_fraction` (their non-padding
        tokens / all their tokens) and `images_per_row` (valid image slots)."""
        out = {}
        for n, (rows, real, imgs, positions) in zip(self.source_names, self._rows, strict=True):
            if rows:
                out[n] = {
                    "rows": float(rows),
                    "real_fraction": float(real / positions),
                    "images_per_row": float(imgs / rows),
                }
        return out

    def metrics(self) -> dict[str, float]:
        """Flat scalars for the trainer's logs: `data/packing_efficiency` (real tokens / all
        tokens), `data/samples`, `data/skipped` and `data/<reason>` totals,
        `data/<source>/<reason>`, and per source over the rows holding its samples
        (`source_rows`) `data/<source>/real_fraction` (their real tokens / all their tokens) and
        `data/<source>/images_per_row`."""
        out: dict[str, float] = {}
        real, total = self._tokens
        out["data/packing_efficiency"] = float(real / total) if total else 0.0
        for n, r in self.source_rows().items():
            out[f"data/{n}/real_fraction"] = r["real_fraction"]
            out[f"data/{n}/images_per_row"] = r["images_per_row"]
        tot = self._counts.sum(0)
        for r, c in zip(packing.REASONS, tot, strict=True):
            out[f"data/{r}"] = float(c)
        out["data/skipped"] = float(tot[packing.SKIP_MASK].sum())
        for n, row in zip(self.source_names, self._counts, strict=True):
            for r, c in zip(packing.REASONS, row, strict=True):
                if c:
                    out[f"data/{n}/{r}"] = float(c)
        return out


def make_train_iterator(
    data_config,
    tokenizer,
    *,
    seq_len: int,
    batch_size_per_host: int,
    image_size: int,
    max_images: int,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    max_skip_fraction: float | None = None,
    skip_check_records: int | None = None,
) -> DataIterator:
    """The training batches of this host.

    Args:
      data_config: see the module docstring (`default_data_config()` plus sources).
      tokenizer: `QWenTokenizer` or `SentencePieceQWenTokenizer`.
      seq_len: T, tokens per packed row (2048 for the paper's stages 2-3, 512 for stage 1).
      batch_size_per_host: rows per batch on this host.
      image_size: S, the stage resolution (224, 448; 56 for the tiny model).
      max_images: M, image slots per row.
      seed: the data seed (shuffling).
      shard_index, shard_count: this host's shard (`jax.process_index()`, `jax.process_count()`).
      worker_count: grain worker processes for tokenizing, packing and image decoding (0: in-process
        with a prefetch thread).
      max_skip_fraction, skip_check_records: None or 0 (default): bad records are only counted. A
        fraction in [0, 1] (the trainer's `data.max_skip_fraction`, with `skip_check_records`):
        each source's first `skip_check_records` records are read and checked here (image paths
        that fit the span, not every record skipped, at most that fraction skipped), and the
        stream stops with `DataError` when that fraction of a source's first records (their images
        included) is skipped. Either way a source whose every record is skipped stops the stream
        with `DataError` instead of never yielding.

    Returns:
      a `DataIterator` yielding dicts of numpy arrays: input_ids, targets, segment_ids, positions,
      image_token_index int32 [B, T]; loss_mask float32 [B, T]; images float32 [B, M, S, S, 3];
      image_valid bool [B, M].
    """
    ds = make_train_dataset(
        data_config,
        tokenizer,
        seq_len=seq_len,
        batch_size_per_host=batch_size_per_host,
        image_size=image_size,
        max_images=max_images,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        worker_count=worker_count,
        max_skip_fraction=max_skip_fraction,
        skip_check_records=skip_check_records,
    )
    return DataIterator(ds, list(_plain(resolve_data_config(data_config).sources)))
