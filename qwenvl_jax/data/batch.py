"""The batch contract between the data pipeline and the trainer: keys, dtypes and shapes.

A batch is a dict of numpy arrays with B rows of T tokens and M image slots:

- `input_ids` int32 [B, T]: token ids, packed samples side by side;
- `targets` int32 [B, T]: the next token (0 where unsupervised);
- `loss_mask` float32 [B, T]: 1 where the target is supervised;
- `segment_ids` int32 [B, T]: 0 = padding, 1.. = the packed sample (attention stays inside it);
- `positions` int32 [B, T]: rotary positions, restarting at 0 per sample;
- `image_token_index` int32 [B, T]: m * n_queries + q inside the m-th image span of the row, else
  -1 (`qwenvl_jax.tokenizer.image_token_index`);
- `images` float32 [B, M, S, S, 3]: normalised pixels; `image_valid` bool [B, M]: the slot holds a
  picture (the two are absent when M = 0).

Loss = sum(loss_mask * CE(logits, targets)) / sum(loss_mask) over the global batch. The trainer
reshapes a step's batch to [A, B/A, ...] for A gradient-accumulation micro-batches.
"""

from __future__ import annotations

import numpy as np

BATCH_SPEC = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "images": np.float32,
    "image_valid": np.bool_,
    "image_token_index": np.int32,
}
BATCH_KEYS = tuple(BATCH_SPEC)
TOKEN_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "image_token_index")
IMAGE_KEYS = ("images", "image_valid")


def batch_shapes(cfg, accum: int) -> dict[str, tuple]:
    """Global shapes [A, B/A, ...] of one train step's batch (A = accum micro-batches).

    Args:
        cfg: a stage config (`batch_size`, `data.seq_len`, `data.max_images`, `data.image_size`).
        accum: micro-batches per optimizer step.
    """
    a = accum
    b, t = cfg.batch_size // a, int(cfg.data.seq_len)
    m, sz = int(cfg.data.max_images), int(cfg.data.image_size)
    shapes = {k: (a, b, t) for k in TOKEN_KEYS}
    if m:
        shapes.update(images=(a, b, m, sz, sz, 3), image_valid=(a, b, m))
    return shapes


def real_work(batch: dict) -> dict[str, int]:
    """What a batch holds besides padding, counted on the host from its arrays.

    Returns:
      `tokens`: positions with `segment_ids` > 0; `attended`: the sum over packed samples of
      (sample length)^2, the attention a packed kernel computes (`flops.work_flops`); `images`:
      valid image slots (0 without images); `positions`: all positions (B * T).
    """
    seg = np.asarray(batch["segment_ids"])
    seg = seg.reshape(-1, seg.shape[-1])
    tokens = int(np.count_nonzero(seg))
    # Segment ids are 1.. per row: offset each row's ids so one bincount counts every sample.
    width = int(seg.max(initial=0)) + 1
    flat = (seg + width * np.arange(seg.shape[0])[:, None])[seg > 0]
    lengths = np.bincount(flat)
    valid = batch.get("image_valid")
    images = int(np.count_nonzero(valid)) if valid is not None else 0
    return dict(
        tokens=tokens,
        attended=int(np.sum(lengths.astype(np.int64) ** 2)),
        images=images,
        positions=int(seg.size),
    )
