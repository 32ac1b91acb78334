"""Packed batches through the tiny model: every packed sample gets exactly the hidden states it gets
when run alone (so no token attends across a segment boundary, positions restart, and each image
slot feeds its own sample's 256 positions)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from qwenvl_jax.config import get_preset
from qwenvl_jax.data import pipeline
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.tokenizer import QWenTokenizer, image_token_index

TINY = get_preset("tiny")
S = TINY.visual.image_size
# float32 end to end; the packed and the single-sample runs differ only in summation order
# (attention over 900 vs ~300 keys, masked entries adding exact zeros), a few ulps of values O(1).
ATOL = 2e-5


@pytest.fixture(scope="module")
def packed_batch(tmp_path_factory):
    d = tmp_path_factory.mktemp("model_data")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        a = rng.integers(0, 255, (S + 3 * i, S, 3), np.uint8)
        Image.fromarray(a).save(d / f"{i}.png")
        n_img = i % 3
        pics = "".join(f"Picture {k + 1}: <img>{(i + k) % 6}.png</img>\n" for k in range(n_img))
        recs.append(
            {
                "conversations": [
                    {"from": "user", "value": pics + f"Question {i}?"},
                    {"from": "assistant", "value": "answer " * (3 + 5 * i)},
                ]
            }
        )
    (d / "c.json").write_text(json.dumps(recs))
    cfg = pipeline.default_data_config()
    cfg.sources.c = pipeline.source_config(path=os.path.join(d, "c.json"), task="chatml")
    cfg.shuffle = False
    cfg.num_open_rows = 1
    tok = QWenTokenizer()
    with pipeline.make_train_iterator(
        cfg, tok, seq_len=1024, batch_size_per_host=1, image_size=S, max_images=3
    ) as it:
        return next(it)


@pytest.mark.slow  # ~45 s on the shared 2-core CPU (model init plus one compile per sample length)
def test_packed_equals_unpacked_through_the_model(packed_batch):
    b = packed_batch
    assert (b["segment_ids"].max(axis=1) >= 3).all()  # several samples per row
    assert b["image_valid"].sum() >= 2
    # The pipeline's image_token_index agrees with the model owner's span numbering.
    idx, counts = image_token_index(b["input_ids"], TINY.visual.image_start_id, 256)
    np.testing.assert_array_equal(idx, b["image_token_index"])
    np.testing.assert_array_equal(counts, b["image_valid"].sum(1))

    model = nnx.jit(
        lambda: QWenLMHeadModel(TINY, ModelOptions(), rngs=nnx.Rngs(0))
    )()  # jit: 3x faster init

    @nnx.jit
    def hidden(m, ids, **kw):
        return m.transformer(ids, **kw)

    packed = hidden(
        model,
        jnp.asarray(b["input_ids"]),
        images=jnp.asarray(b["images"]),
        image_token_index=jnp.asarray(b["image_token_index"]),
        segment_ids=jnp.asarray(b["segment_ids"]),
        positions=jnp.asarray(b["positions"]),
    )
    packed = np.asarray(packed)
    checked = 0
    for r in range(b["input_ids"].shape[0]):
        for s in range(1, int(b["segment_ids"][r].max()) + 1):
            sel = b["segment_ids"][r] == s
            ids = b["input_ids"][r][sel][None]
            slots = np.unique(b["image_token_index"][r][sel][b["image_token_index"][r][sel] >= 0])
            slots = sorted({int(v) // 256 for v in slots})
            kw = {}
            if slots:
                own_idx, _ = image_token_index(ids, TINY.visual.image_start_id, 256)
                kw = dict(
                    images=jnp.asarray(b["images"][r, slots][None]),
                    image_token_index=jnp.asarray(own_idx),
                )
            alone = hidden(model, jnp.asarray(ids), **kw)  # positions 0.., one segment
            np.testing.assert_allclose(packed[r][sel], np.asarray(alone)[0], atol=ATOL, rtol=0)
            checked += 1
    assert checked >= 3
