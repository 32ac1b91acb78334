"""Packing invariants: positions restart, no target crosses a sample boundary, image slots line up
with the 256 positions of their span, images are never split, truncation/drop are counted, and
the packer's state restores exactly."""

import grain
import numpy as np
import pytest

from qwenvl_jax.data import packing
from qwenvl_jax.data.tasks import Example, Skip

IMG, IMG_END, PAD_IMG, EOD = 151857, 151858, 151859, 151643
IDS = dict(pad_id=EOD, img_start_id=IMG, img_end_id=IMG_END)


def span():
    return [IMG] + [100] * 3 + [PAD_IMG] * 253 + [IMG_END]


def make(index, n_text_before, n_images, n_text_after, source="s", sup_from=None):
    """A sample: text, n images, text; labels on the trailing text."""
    ids = list(range(1000 + index, 1000 + index + n_text_before))
    for _ in range(n_images):
        ids += span()
    ids += [5000 + (index % 50)] * n_text_after
    sup_from = len(ids) - n_text_after if sup_from is None else sup_from
    labels = [i >= sup_from for i in range(len(ids))]
    return Example(
        np.asarray(ids, np.int32),
        np.asarray(labels, bool),
        [f"img{index}_{k}" for k in range(n_images)],
        source,
        index,
    )


def check_row(row, examples, T, M):
    seg, pos, tgt, lm = row["segment_ids"], row["positions"], row["targets"], row["loss_mask"]
    iti, ids = row["image_token_index"], row["input_ids"]
    assert [len(row[k]) for k in ("input_ids", "targets", "loss_mask", "segment_ids")] == [T] * 4
    start = 0
    slot = 0
    for s, ex in enumerate(examples, start=1):
        n = len(ex.ids)
        sl = slice(start, start + n)
        assert (seg[sl] == s).all()
        assert pos[sl].tolist() == list(range(n))  # positions restart per sample
        assert ids[sl].tolist() == ex.ids.tolist()
        # Targets: next token of the same sample; the last token of a sample predicts nothing.
        assert tgt[start : start + n - 1].tolist() == ex.ids[1:].tolist()
        assert tgt[start + n - 1] == 0 and lm[start + n - 1] == 0
        assert lm[start : start + n - 1].tolist() == ex.labels[1:].astype(float).tolist()
        # Image slots: the k-th image of this sample is slot `slot`, its 256 interior positions hold
        # slot*256 + q in order; <img>/</img> themselves hold -1.
        for a in np.flatnonzero(ex.ids == IMG):
            p = start + a
            assert iti[p] == -1 and iti[p + 257] == -1 and ids[p + 257] == IMG_END
            assert iti[p + 1 : p + 257].tolist() == list(range(slot * 256, slot * 256 + 256))
            k = list(np.flatnonzero(ex.ids == IMG)).index(a)
            assert row["image_valid"][slot] and row["image_srcs"][slot] == ex.images[k]
            slot += 1
        start += n
    assert (seg[start:] == 0).all() and (lm[start:] == 0).all() and (tgt[start:] == 0).all()
    assert (ids[start:] == EOD).all() and (pos[start:] == 0).all()
    assert (iti >= 0).sum() == 256 * slot
    assert not row["image_valid"][slot:].any() and len(row["image_valid"]) == M
    # A target never crosses a boundary: wherever the next token is another segment, no loss.
    boundary = np.flatnonzero(seg[:-1] != seg[1:])
    assert (lm[boundary] == 0).all() and (tgt[boundary] == 0).all()


def test_pack_row_layout():
    exs = [make(0, 5, 1, 7), make(1, 3, 2, 4), make(2, 10, 0, 6)]
    T = sum(len(e) for e in exs) + 9
    row = packing.pack_row(exs, T, 4, **IDS)
    check_row(row, exs, T, 4)
    assert row["image_segment"].tolist() == [1, 2, 2, 0]


def test_pack_row_hand_values():
    a = Example(np.array([7, 8, 9], np.int32), np.array([0, 1, 1], bool), [], "s", 0)
    b = Example(np.array([4, 5], np.int32), np.array([0, 1], bool), [], "s", 1)
    row = packing.pack_row([a, b], 7, 1, **IDS)
    assert row["input_ids"].tolist() == [7, 8, 9, 4, 5, EOD, EOD]
    assert row["targets"].tolist() == [8, 9, 0, 5, 0, 0, 0]
    assert row["loss_mask"].tolist() == [1, 1, 0, 1, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0]


def test_truncate_never_splits_an_image():
    # 10 + 2 * 258 + 50 tokens; labels from token 5 on. A cut at 300 falls inside the second span
    # (tokens 268..525), so the sample is cut just before that span's <img>.
    ex = make(1, 10, 2, 50, sup_from=5)
    out, ev = packing.fit_example(ex, 300, 4, IMG, IMG_END, "truncate")
    assert ev == "truncated" and len(out) == 268 and out.images == ex.images[:1]
    assert out.ids.tolist() == ex.ids[:268].tolist() and out.ids[-1] == IMG_END
    # The same sample with labels only on the trailing text has none left after the cut: dropped.
    ex = make(0, 10, 2, 50)
    out, ev = packing.fit_example(ex, 300, 4, IMG, IMG_END, "truncate")
    assert out is None and ev == "dropped_no_loss"
    out, ev = packing.fit_example(ex, 600, 4, IMG, IMG_END, "drop")
    assert out is ex and ev is None
    out, ev = packing.fit_example(ex, 500, 4, IMG, IMG_END, "drop")
    assert out is None and ev == "dropped_too_long"
    # Too many images: cut before the third image's <img>.
    ex3 = make(2, 4, 3, 0, sup_from=1)
    out, ev = packing.fit_example(ex3, 2000, 2, IMG, IMG_END, "truncate")
    assert ev == "truncated" and len(out) == 4 + 2 * 258 and len(out.images) == 2


def _dataset(elements):
    return grain.MapDataset.source(elements)


def _pack(elements, T=700, M=3, rows=3, too_long="truncate"):
    return packing.PackIterDataset(
        _dataset(elements),
        seq_len=T,
        max_images=M,
        source_names=["s", "t"],
        num_open_rows=rows,
        too_long=too_long,
        **IDS,
    )


def _corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 11 == 5:
            out.append(Skip("t", i, "image_missing", "gone"))
            continue
        k = int(rng.integers(0, 3))
        out.append(make(i, int(rng.integers(1, 40)), k, int(rng.integers(2, 200)), "st"[i % 2]))
    return out


def test_pack_iterator_invariants_and_counts():
    elements = _corpus()
    elements.append(make(99, 10, 0, 900, "s"))  # too long for T=700: truncated
    rows = list(_pack(elements))
    seen = []
    total = np.zeros((2, len(packing.REASONS)), np.int64)
    for row in rows:
        exs = []
        for s in range(1, row["segment_ids"].max() + 1):
            n = int((row["segment_ids"] == s).sum())
            exs.append(n)
        total += row["_counts"]
        seen.append(exs)
    # Every real example appears once, in a row with the right layout.
    n_real = sum(isinstance(e, Example) for e in elements)
    r = packing.REASON_INDEX
    assert total[:, r["samples"]].sum() == n_real
    assert total[1, r["image_missing"]] == sum(isinstance(e, Skip) for e in elements)
    long = [e for e in elements if isinstance(e, Example) and len(e) > 700]
    assert len(long) >= 2  # the 900-token one and some two-image samples of the corpus
    assert total[:, r["truncated"]].sum() == len(long)
    real = sum(int((row["segment_ids"] > 0).sum()) for row in rows)
    assert total[:, r["tokens"]].sum() == real
    for row in rows:
        assert row["segment_ids"].shape == (700,)
        assert row["image_valid"].sum() <= 3
        check_boundaries(row)


def check_boundaries(row):
    seg, lm, pos = row["segment_ids"], row["loss_mask"], row["positions"]
    boundary = np.flatnonzero(seg[:-1] != seg[1:])
    assert (lm[boundary] == 0).all()
    starts = np.flatnonzero((seg > 0) & np.concatenate([[True], seg[1:] != seg[:-1]]))
    assert (pos[starts] == 0).all()
    iti = row["image_token_index"]
    for m in np.flatnonzero(row["image_valid"]):
        where = np.flatnonzero(iti // 256 == m)
        assert len(where) == 256 and (np.diff(where) == 1).all()
        assert row["input_ids"][where[0] - 1] == IMG and row["input_ids"][where[-1] + 1] == IMG_END
        assert len(set(seg[where])) == 1 and seg[where[0]] == row["image_segment"][m]


def test_pack_layout_against_examples():
    elements = [make(i, 3 + i, i % 3, 20 + 7 * i) for i in range(12)]
    for row in _pack(elements, T=1100, M=4, rows=2):
        n_seg = row["segment_ids"].max()
        lengths = [int((row["segment_ids"] == s).sum()) for s in range(1, n_seg + 1)]
        # Recover the examples by their first token (1000 + index).
        firsts = [
            row["input_ids"][int(np.flatnonzero(row["segment_ids"] == s)[0])]
            for s in range(1, n_seg + 1)
        ]
        exs = [elements[int(f) - 1000] for f in firsts]
        assert lengths == [len(e) for e in exs]
        check_row(row, exs, 1100, 4)


def test_pack_state_restores_exactly():
    elements = _corpus(80, seed=1)
    ds = _pack(elements, rows=4)
    full = list(ds)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert set(state) == {"next_index", "open_rows", "pending_counts"}
    rest = list(it)
    it2 = iter(ds)
    it2.set_state(state)
    rest2 = list(it2)
    assert len(rest) == len(rest2) == len(full) - 5
    for a, b in zip(rest, rest2, strict=True):
        for k in ("input_ids", "loss_mask", "segment_ids", "image_token_index", "_counts"):
            np.testing.assert_array_equal(a[k], b[k])
        assert a["image_srcs"] == b["image_srcs"]


def test_efficiency_first_fit_beats_one_per_row():
    # ~120-token texts plus 0-2 images: 2048-token rows hold ~5 samples when 8 image slots allow.
    elements = _corpus(200, seed=3)

    def efficiency(rows, M):
        out = list(_pack(elements, T=2048, M=M, rows=rows))
        full = out[:-rows]  # the last `rows` rows are flushed part-full at the end of the data
        return np.mean([(r["segment_ids"] > 0).mean() for r in full])

    one, eight = efficiency(1, 8), efficiency(8, 8)
    assert eight > 0.95 and eight > one + 0.05, (one, eight)
    # With only 4 image slots a row runs out of slots before tokens.
    assert efficiency(8, 4) < 0.85


def test_bad_span_raises():
    ex = Example(np.array([1, IMG, 2, 3], np.int32), np.ones(4, bool), ["x"], "s", 0)
    with pytest.raises(ValueError, match="image span"):
        packing.pack_row([ex], 10, 1, **IDS)


def test_short_image_spans():
    # Spans of a model with Q = 9 adapter queries: <img> + 9 + </img>.
    q = 9
    span9 = [IMG] + [100] * 2 + [PAD_IMG] * 7 + [IMG_END]

    def ex(index, n_images, n_text):
        ids = [1, 2] + span9 * n_images + [7] * n_text
        labels = [i >= len(ids) - n_text for i in range(len(ids))]
        images = [f"img{index}_{k}" for k in range(n_images)]
        return Example(np.asarray(ids, np.int32), np.asarray(labels, bool), images, "s", index)

    a, b = ex(0, 2, 3), ex(1, 1, 4)
    row = packing.pack_row([a, b], 48, 4, **IDS, n_queries=q)
    iti = row["image_token_index"]
    # Slot m's interior holds m * 9 + 0..8, in order of appearance across the packed samples.
    assert iti[3:12].tolist() == list(range(0, 9)) and iti[14:23].tolist() == list(range(9, 18))
    start_b = len(a.ids)
    assert iti[start_b + 3 : start_b + 12].tolist() == list(range(18, 27))
    assert (iti >= 0).sum() == 27 and row["image_valid"].tolist() == [True, True, True, False]
    # Truncation respects the short span: a cut inside the second span moves before its <img>.
    out, ev = packing.fit_example(ex(2, 2, 20), 20, 4, IMG, IMG_END, "truncate", n_queries=q)
    assert (out, ev) == (None, "dropped_no_loss")  # labels only on the trailing text: none left
    long_text = Example(
        np.asarray([1, 2] + span9 * 2 + [7] * 5, np.int32),
        np.asarray([False, True] + [False] * 22 + [True] * 5, bool),
        ["x", "y"],
        "s",
        3,
    )
    out, ev = packing.fit_example(long_text, 20, 4, IMG, IMG_END, "truncate", n_queries=q)
    assert ev == "truncated" and len(out) == 13 and out.images == ["x"]
    # A 256-position reading of these spans is an error, not a silent misplacement.
    with pytest.raises(ValueError, match="does not open a 258-token image span"):
        packing.pack_row([a], 48, 4, **IDS)
