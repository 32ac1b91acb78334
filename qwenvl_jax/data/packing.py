"""Packing tokenized samples into fixed-length rows with segment ids and static image slots.

A packed row of length T with M image slots holds (see docs/architecture.md, "Batches"):
`input_ids`, `targets` (the next token of the same sample, 0 elsewhere), `loss_mask` (the target
is a supervised label), `segment_ids` (1.. per sample, 0 = padding), `positions` (restart at 0 per
sample), `image_token_index` (m * Q + q on the Q positions inside the m-th image's
`<img>...</img>`, -1 elsewhere; Q = `n_queries`, the tokenizer's `image_span`, 256 as published),
plus the image sources of the M slots (loaded later, after packing, so the packer's buffer and
checkpoint state hold only indices).

`PackIterDataset` packs first-fit into a bounded number of open rows. Its state is the next record
index and the record indices held by the open rows, so it restores exactly by re-reading those
records from its `MapDataset` parent (tokenization is deterministic).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import grain
import numpy as np

from qwenvl_jax.data.tasks import Example, Skip
from qwenvl_jax.tokenizer import image_span_starts

N_QUERIES = 256  # inner positions of an image span as published (functions take n_queries)

# Metrics counters, per source. The first ones count samples; the rest count skipped or converted
# records by reason (tasks.BadSample reasons, image loading problems).
REASONS = (
    "samples",  # samples packed
    "tokens",  # real tokens packed
    "truncated",
    "dropped_too_long",
    "dropped_no_loss",
    "box_clipped",
    "bad_record",
    "missing_field",
    "bad_field",
    "bad_box",
    "box_outside_image",
    "malformed_conversation",
    "unclosed_img",
    "image_path_too_long",
    "bad_image_tag",
    "image_missing",
    "image_corrupt",
    "image_too_small",
    "image_converted",
    "other",
    # Appended (not inserted) so counters saved in older checkpoints keep their indices.
    "stray_img_end",
    "image_not_regular_file",
    "image_too_large",
)
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}
# Counters that are not skipped records (the sample still trains, or it counts samples).
NOT_SKIPS = ("samples", "tokens", "truncated", "box_clipped", "image_converted")
SKIP_MASK = np.array([r not in NOT_SKIPS for r in REASONS])


def reason_index(reason: str) -> int:
    return REASON_INDEX.get(reason, REASON_INDEX["other"])


def pad_counts(counts, shape: tuple[int, int]) -> np.ndarray:
    """Counters restored from a checkpoint, zero-padded for reasons appended since it was saved."""
    c = np.array(counts, np.int64).reshape(shape[0], -1)
    out = np.zeros(shape, np.int64)
    out[:, : c.shape[1]] = c[:, : shape[1]]
    return out


def counts_text(row) -> str:
    """`bad_record 3, image_missing 1`: the skip counters of one source's counts row [REASONS]."""
    pairs = zip(REASONS, row, SKIP_MASK, strict=True)
    return ", ".join(f"{r} {int(c)}" for r, c, m in pairs if m and c)


@dataclasses.dataclass(frozen=True)
class SkipLimit:
    """When skipped records stop a run instead of being only counted (per source).

    Attributes:
      labels: what the message calls each source ("data file a.json"), in source order.
      sizes: each source's record count. That many records skipped in a row with no sample trained
        since means every record is skipped: the stream would never yield a row, so it stops.
      max_fraction: None, or the largest fraction of a source's first `window` records that may be
        skipped (the trainer's `--config.data.max_skip_fraction`).
      window: records per source over which `max_fraction` is judged (`data.skip_check_records`).
    """

    labels: tuple
    sizes: tuple
    max_fraction: float | None
    window: int

    def error(self, name: str, s: int, row, first: str | None, *, every: bool, read: int):
        """The `DataError` of source `s` (name, counts row, first skip message)."""
        from qwenvl_jax.data.sources import DataError

        skipped = int(row[SKIP_MASK].sum())
        if every:
            what = f"every record is skipped ({skipped} of {read}: {counts_text(row)})"
        else:
            what = (
                f"{skipped} of {read} records skipped ({counts_text(row)}), more than"
                f" --config.data.max_skip_fraction={self.max_fraction:g} of the first"
                f" {self.window} (--config.data.skip_check_records)"
            )
        tail = f"; first: {first}" if first else ""
        return DataError(f"data source {name!r} ({self.labels[s]}): {what}{tail}")


class SkipGuard:
    """Applies a `SkipLimit` to a stream of counts: the packer feeds it every skip as it happens
    and the counts of every row it hands on; `check` raises `DataError` when the limit is passed.

    Its state (`get_state`) travels in the packer's checkpoint state.
    """

    def __init__(self, names: Sequence[str], limit: SkipLimit):
        self.names, self.limit = list(names), limit
        self.seen = np.zeros((len(names), len(REASONS)), np.int64)  # rows handed on
        self.skips_at_good = np.zeros(len(names), np.int64)  # skips when a sample last trained
        self.closed = np.zeros(len(names), bool)  # max_fraction judged and passed
        self.first: dict[int, str] = {}  # the first skip message per source, for the error

    def note(self, s: int, message: str) -> None:
        self.first.setdefault(s, message)

    def row_done(self, counts: np.ndarray) -> None:
        """A row was handed on with these counts (its pending skips included)."""
        self.seen += counts
        good = counts[:, REASON_INDEX["samples"]] > 0
        self.skips_at_good[good] = self.seen[good][:, SKIP_MASK].sum(1)

    def check(self, pending: np.ndarray) -> None:
        """Raises `DataError` for the first source over its limit (`pending`: counts not yet in a
        handed-on row)."""
        total = self.seen + pending
        skips = total[:, SKIP_MASK].sum(1)
        samples = total[:, REASON_INDEX["samples"]]
        frac, window = self.limit.max_fraction, self.limit.window
        for s, name in enumerate(self.names):
            size = self.limit.sizes[s]
            if size and skips[s] - self.skips_at_good[s] >= size:
                read = int(skips[s] + samples[s])
                raise self.limit.error(name, s, total[s], self.first.get(s), every=True, read=read)
            if frac is None or self.closed[s]:
                continue
            if skips[s] > frac * window:
                read = int(skips[s] + samples[s])
                first = self.first.get(s)
                raise self.limit.error(name, s, total[s], first, every=not samples[s], read=read)
            if skips[s] + samples[s] >= window:
                self.closed[s] = True

    def get_state(self) -> dict:
        return {
            "seen": self.seen.tolist(),
            "skips_at_good": self.skips_at_good.tolist(),
            "closed": self.closed.tolist(),
        }

    def set_state(self, state: dict | None) -> None:
        if state:
            self.seen = pad_counts(state["seen"], self.seen.shape)
            self.skips_at_good = np.array(state["skips_at_good"], np.int64)
            self.closed = np.array(state["closed"], bool)


def fit_example(
    ex: Example,
    seq_len: int,
    max_images: int,
    img_start_id: int,
    img_end_id: int,
    too_long: str = "truncate",
    n_queries: int = N_QUERIES,
) -> tuple[Example | None, str | None]:
    """Make `ex` fit one row: at most `seq_len` tokens and `max_images` images.

    A too-long sample is cut at `seq_len` or, when that falls inside an image span, just before the
    span's `<img>`; images beyond `max_images` are cut the same way. With `too_long="drop"` such a
    sample is dropped instead. A sample left without a supervised label (position >= 1) is dropped.

    Returns:
      (example or None, event): event is "truncated", "dropped_too_long" or "dropped_no_loss" (None
      when the sample fit as it was).
    """
    span = n_queries + 2
    starts = image_span_starts(ex.ids, img_start_id, img_end_id, n_queries)
    cut = len(ex.ids)
    if cut > seq_len:
        cut = seq_len
    if len(starts) > max_images:
        cut = min(cut, starts[max_images])
    for a in starts:
        if a < cut < a + span:
            cut = a
    event = None
    if cut < len(ex.ids):
        if too_long == "drop":
            return None, "dropped_too_long"
        if too_long != "truncate":
            raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
        n_img = sum(1 for a in starts if a + span <= cut)
        ex = Example(
            ids=ex.ids[:cut],
            labels=ex.labels[:cut],
            images=ex.images[:n_img],
            source=ex.source,
            index=ex.index,
            events=ex.events,
        )
        event = "truncated"
    if len(ex.ids) < 2 or not ex.labels[1:].any():
        return None, "dropped_no_loss"
    return ex, event


def pack_row(
    examples: Sequence[Example],
    seq_len: int,
    max_images: int,
    *,
    pad_id: int,
    img_start_id: int,
    img_end_id: int,
    n_queries: int = N_QUERIES,
) -> dict:
    """Pack examples (each already fitting, together at most seq_len tokens / max_images images).

    Returns:
      dict of numpy arrays: input_ids, targets, segment_ids, positions, image_token_index int32 [T],
      loss_mask float32 [T], image_valid bool [M], image_segment int32 [M] (the slot's segment id,
      0 if empty), and "image_srcs": a list of M image sources (None for empty slots).
    """
    T, M = seq_len, max_images
    input_ids = np.full(T, pad_id, np.int32)
    targets = np.zeros(T, np.int32)
    loss_mask = np.zeros(T, np.float32)
    segment_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    image_token_index = np.full(T, -1, np.int32)
    image_valid = np.zeros(M, bool)
    image_segment = np.zeros(M, np.int32)
    srcs: list = [None] * M
    pos, m = 0, 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex.ids)
        if pos + n > T:
            raise ValueError(f"examples hold more than seq_len={T} tokens")
        sl = slice(pos, pos + n)
        input_ids[sl] = ex.ids
        targets[pos : pos + n - 1] = ex.ids[1:]
        loss_mask[pos : pos + n - 1] = ex.labels[1:]
        segment_ids[sl] = seg
        positions[sl] = np.arange(n, dtype=np.int32)
        starts = image_span_starts(ex.ids, img_start_id, img_end_id, n_queries)
        if len(starts) != len(ex.images):
            raise ValueError(
                f"{ex.source}[{ex.index}]: {len(starts)} image spans but {len(ex.images)} images"
            )
        for a, src in zip(starts, ex.images, strict=True):
            if m >= M:
                raise ValueError(f"examples hold more than max_images={M} images")
            inner = slice(pos + a + 1, pos + a + 1 + n_queries)
            image_token_index[inner] = m * n_queries + np.arange(n_queries, dtype=np.int32)
            image_valid[m] = True
            image_segment[m] = seg
            srcs[m] = src
            m += 1
        pos += n
    return dict(
        input_ids=input_ids,
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segment_ids,
        positions=positions,
        image_token_index=image_token_index,
        image_valid=image_valid,
        image_segment=image_segment,
        image_srcs=srcs,
    )


def blank_segment(row: dict, seg: int, pad_id: int, image_segment: np.ndarray) -> None:
    """Turn segment `seg` of a packed row into padding in place (its sample is dropped late).

    `image_segment` [M] is `pack_row`'s slot -> segment map."""
    sel = row["segment_ids"] == seg
    row["input_ids"][sel] = pad_id
    row["targets"][sel] = 0
    row["loss_mask"][sel] = 0
    row["positions"][sel] = 0
    row["image_token_index"][sel] = -1
    row["segment_ids"][sel] = 0
    row["image_valid"][image_segment == seg] = False


class PackIterDataset(grain.IterDataset):
    """First-fit packing of a mixture of `MapDataset`s of `Example | Skip` into rows.

    The sources are sharded *before* they are mixed (host shard, then grain worker slice), so every
    host and worker sees the configured mixture; a strided slice of an interleaved mixture would
    hand whole tasks to single hosts.

    Args:
      parents: a MapDataset, or a list of them to mix, whose elements are `Example` or `Skip` (one
        per record index).
      weights: mixture weights (None: equal); grain's deterministic proportional interleave.
      seq_len: T, tokens per row.
      max_images: M, image slots per row.
      pad_id, img_start_id, img_end_id: token ids from the tokenizer.
      n_queries: inner positions of an image span (the tokenizer's `image_span`).
      source_names: the names of the sources; counters are kept per source in this order.
      num_open_rows: how many rows are filled at once (the bounded buffer); when a sample fits none,
        the oldest row is emitted.
      too_long: "truncate" or "drop".
      max_samples: samples per row at most (0: as many as fit; 1: no packing, one sample per row
        as the published finetune.py pads each sample to the row).
      shard_index, shard_count: this host's share of every source (`src[index::count]`).
      row_transform: applied to each finished row (image loading, which may turn samples with bad
        images into padding); a row left with no sample is not emitted, its counters carry over.
        It may add `_skip_first` {source index: message} for the skip limit's error.
      skip_limit: when skipped records stop the stream with `DataError` (`SkipLimit`); None: they
        are only counted (a source whose every record is skipped then never yields).
    """

    def __init__(
        self,
        parents: grain.MapDataset | Sequence[grain.MapDataset],
        weights: Sequence[float] | None = None,
        *,
        seq_len: int,
        max_images: int,
        pad_id: int,
        img_start_id: int,
        img_end_id: int,
        source_names: Sequence[str],
        num_open_rows: int = 8,
        too_long: str = "truncate",
        shard_index: int = 0,
        shard_count: int = 1,
        row_transform: Callable[[dict], dict] | None = None,
        n_queries: int = N_QUERIES,
        skip_limit: SkipLimit | None = None,
        max_samples: int = 0,
    ):
        super().__init__()
        if too_long not in ("truncate", "drop"):
            raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
        if seq_len < n_queries + 4 and max_images > 0:
            raise ValueError(
                f"seq_len={seq_len} cannot hold an image span of {n_queries + 2} tokens"
            )
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
        self._parents_ds = [parents] if isinstance(parents, grain.MapDataset) else list(parents)
        self._weights = None if weights is None else list(weights)
        self._shard = (shard_index, shard_count)
        self._ds = self._build()
        self.seq_len = seq_len
        self.max_images = max_images
        self.ids = dict(pad_id=pad_id, img_start_id=img_start_id, img_end_id=img_end_id)
        self.n_queries = n_queries
        self.source_names = list(source_names)
        self.num_open_rows = max(1, num_open_rows)
        self.too_long = too_long
        self.row_transform = row_transform
        self.skip_limit = skip_limit
        self.max_samples = max(0, int(max_samples))

    def _build(self) -> grain.MapDataset:
        k, n = self._shard
        parts = [d[k::n] for d in self._parents_ds]
        return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self._weights)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain's worker slicing (mp_prefetch): worker w of W packs `src[k + n*w :: n*W]`."""
        k, n = self._shard
        self._shard = (k + n * (sl.start or 0), n * (sl.step or 1))
        self._ds = self._build()

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self.seq_len}, max_images={self.max_images})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, ds: PackIterDataset):
        super().__init__()
        self._d = ds
        self._src_index = {n: i for i, n in enumerate(ds.source_names)}
        self._reset(0, [], None)

    def _reset(self, next_index: int, rows: list, counts) -> None:
        self._next = next_index
        self._rows_idx: list[list[int]] = [list(r) for r in rows]
        self._rows_ex: list[list[Example]] = [[self._fit(i)[0] for i in r] for r in rows]
        shape = (len(self._d.source_names), len(REASONS))
        self._counts = np.zeros(shape, np.int64) if counts is None else pad_counts(counts, shape)
        limit = self._d.skip_limit
        self._guard = None if limit is None else SkipGuard(self._d.source_names, limit)

    def _check(self) -> None:
        if self._guard is not None:
            self._guard.check(self._counts)

    def _count(self, source: str, reason: str, n: int = 1) -> None:
        s = self._src_index.get(source)
        if s is None:
            raise KeyError(f"source {source!r} not among {self._d.source_names}")
        self._counts[s, reason_index(reason)] += n

    def _fit(self, index: int):
        el = self._d._ds[index]
        if isinstance(el, Skip):
            return el, None
        try:
            ex, event = fit_example(
                el,
                self._d.seq_len,
                self._d.max_images,
                self._d.ids["img_start_id"],
                self._d.ids["img_end_id"],
                self._d.too_long,
                self._d.n_queries,
            )
        except ValueError as e:  # malformed image spans the task format let through: skip it
            return Skip(el.source, el.index, "bad_image_tag", str(e)), None
        return (el, event) if ex is None else (ex, event)

    def _emit(self, k: int) -> dict:
        self._rows_idx.pop(k)
        exs = self._rows_ex.pop(k)
        row = pack_row(
            exs,
            self._d.seq_len,
            self._d.max_images,
            pad_id=self._d.ids["pad_id"],
            img_start_id=self._d.ids["img_start_id"],
            img_end_id=self._d.ids["img_end_id"],
            n_queries=self._d.n_queries,
        )
        for ex in exs:
            self._count(ex.source, "samples")
            self._count(ex.source, "tokens", len(ex.ids))
        row["image_sources"] = [(e.source, e.index) for e in exs for _ in e.images]
        row["_counts"] = self._counts
        self._counts = np.zeros_like(self._counts)
        return row

    def __next__(self) -> dict:
        while True:
            row = self._next_row()
            if self._d.row_transform is not None:
                row = self._d.row_transform(row)
            first = row.pop("_skip_first", None) or {}
            if self._guard is not None:
                for s, message in first.items():
                    self._guard.note(s, message)
            if row["segment_ids"].any():
                if self._guard is not None:
                    self._guard.row_done(row["_counts"])
                    self._check()
                return row
            self._counts += row["_counts"]
            self._check()

    def _next_row(self) -> dict:
        T, M = self._d.seq_len, self._d.max_images
        n_records = len(self._d._ds)
        while self._next < n_records:
            i = self._next
            self._next += 1
            el, event = self._fit(i)
            if isinstance(el, Skip):
                logging.warning(
                    "data: skipped %s[%d] (%s): %s", el.source, el.index, el.reason, el.message
                )
                self._count(el.source, el.reason)
                if self._guard is not None:
                    self._guard.note(self._src_index[el.source], f"record {el.index}: {el.message}")
                    self._check()
                continue
            for e in el.events:
                self._count(el.source, e)
            if event in ("dropped_too_long", "dropped_no_loss"):
                logging.warning("data: %s %s[%d]", event, el.source, el.index)
                self._count(el.source, event)
                self._check()
                continue
            if event == "truncated":
                self._count(el.source, "truncated")
            n, k = len(el.ids), len(el.images)
            target = None
            cap = self._d.max_samples
            for r, exs in enumerate(self._rows_ex):
                if sum(len(e) for e in exs) + n <= T and sum(len(e.images) for e in exs) + k <= M:
                    if not cap or len(exs) < cap:
                        target = r
                        break
            out = None
            if target is None:
                if len(self._rows_ex) >= self._d.num_open_rows:
                    out = self._emit(0)
                self._rows_idx.append([i])
                self._rows_ex.append([el])
                if cap == 1:  # the row is done (the buffer stays empty: nothing was emitted)
                    out = self._emit(len(self._rows_ex) - 1)
            else:
                self._rows_idx[target].append(i)
                self._rows_ex[target].append(el)
                exs = self._rows_ex[target]
                if sum(len(e) for e in exs) == T or len(exs) == cap:
                    out = self._emit(target)
            if out is not None:
                return out
        if self._rows_ex:
            return self._emit(0)
        raise StopIteration

    def get_state(self) -> dict:
        state = {
            "next_index": int(self._next),
            "open_rows": [list(map(int, r)) for r in self._rows_idx],
            "pending_counts": self._counts.tolist(),
        }
        if self._guard is not None:
            state["skip_guard"] = self._guard.get_state()
        return state

    def set_state(self, state: dict) -> None:
        self._reset(int(state["next_index"]), state["open_rows"], state["pending_counts"])
        if self._guard is not None:
            self._guard.set_state(state.get("skip_guard"))
