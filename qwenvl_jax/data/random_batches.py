"""Deterministic synthetic batches in the batch contract (`data.batch`), for smoke tests,
benchmarks and dry runs (`config.data.kind = "random"`)."""

from __future__ import annotations

import numpy as np

from qwenvl_jax.config import QWenConfig
from qwenvl_jax.tokenizer import image_token_index


class RandomBatches:
    """Deterministic synthetic batches in the batch contract, for smoke tests, benchmarks and
    dry runs: each row packs two samples (segments 1 and 2, positions restarting), each with one
    `<img>` + n_queries + `</img>` span per image slot that fits, then a learnable token pattern
    (arithmetic progressions), supervised outside image spans. State = the number of batches."""

    def __init__(self, cfg, mcfg: QWenConfig, batch_size_per_host: int, shard_index: int):
        # Rows are a function of (seed, batch count, global row), so any number of hosts sees the
        # same global batch: host k holds rows [k * b, (k + 1) * b).
        self.t = int(cfg.data.seq_len)
        self.m = int(cfg.data.max_images)
        self.size = int(cfg.data.image_size)
        self.b = batch_size_per_host
        self.seed = int(cfg.seed)
        self.shard = shard_index
        self.q = mcfg.visual.n_queries
        self.start_id = mcfg.visual.image_start_id
        # Text ids stay below the image markers (a small vocabulary holds them under 1000).
        self.vocab = min(mcfg.vocab_size, 1000, self.start_id)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        count = self.count
        self.count += 1
        t, m, q = self.t, self.m, self.q
        ids = np.zeros((self.b, t), np.int32)
        seg = np.zeros((self.b, t), np.int32)
        pos = np.zeros((self.b, t), np.int32)
        mask = np.zeros((self.b, t), np.float32)
        n_img = np.zeros((self.b,), np.int32)
        half = t // 2
        images = np.zeros((self.b, m, self.size, self.size, 3), np.float32)
        for r in range(self.b):
            rng = np.random.default_rng([self.seed, count, self.shard * self.b + r])
            images[r] = rng.standard_normal(images.shape[1:], np.float32)
            for si, (lo, hi) in enumerate(((0, half), (half, t))):
                seg[r, lo:hi] = si + 1
                pos[r, lo:hi] = np.arange(hi - lo)
                p = lo
                while n_img[r] < m and p + q + 2 + 4 <= hi and si == n_img[r] % 2:
                    ids[r, p] = self.start_id
                    ids[r, p + 1 : p + 1 + q] = self.start_id + 2
                    ids[r, p + 1 + q] = self.start_id + 1
                    p += q + 2
                    n_img[r] += 1
                a, d = rng.integers(1, 50), rng.integers(1, 7)
                ids[r, p:hi] = 10 + (a + d * np.arange(hi - p)) % (self.vocab - 10)
                mask[r, p : hi - 1] = 1.0
        targets = np.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        targets *= mask.astype(np.int32)
        index, _ = image_token_index(ids, self.start_id, q)
        out = dict(
            input_ids=ids,
            targets=targets,
            loss_mask=mask,
            segment_ids=seg,
            positions=pos,
            image_token_index=index,
        )
        if m:
            out["images"] = images
            out["image_valid"] = np.arange(m)[None, :] < n_img[:, None]
        return out

    def get_state(self) -> dict:
        return {"count": self.count}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])
