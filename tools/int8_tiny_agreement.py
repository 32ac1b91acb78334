"""int8 weight-only quantization vs float32 on the tiny random model: greedy generations and logits.

20 synthetic prompts (random ids, one random image span each, seeded), greedy decoding of 16 new
tokens with `generate.generate` in float32 and with `quantize="int8"` (same random weights), and a
full-prompt forward of each: the fraction of identical generations and the largest relative logit
difference max|l_int8 - l_f32| / max|l_f32| (per prompt, over all positions and the vocabulary).

  python tools/int8_tiny_agreement.py

Found with it (2026-12-02): `resampler.py` `_project` read `in_proj.kernel[:, s]` directly, so
under int8 the adapter's q/k/v projections used the raw int8 codes without `kernel_scale` (0/20
identical generations, 160 % logit difference); fixed there, 13/20 identical and 2.2 % after.
"""

import json

import jax.numpy as jnp
import numpy as np

from qwenvl_jax.api import QwenVL
from qwenvl_jax.generate import generate
from qwenvl_jax.tokenizer import image_token_index

N, NEW = 20, 16
f32 = QwenVL.random("tiny", seed=0)
q8 = QwenVL.random("tiny", seed=0, quantize="int8")
cfg = f32.model.config
v = cfg.visual
rng = np.random.default_rng(0)
same, rel, tok_agree = 0, [], []
for _i in range(N):
    n_text = int(rng.integers(8, 40))
    text = rng.integers(0, min(cfg.vocab_size, 150000), n_text).tolist()
    ids = text[: n_text // 2] + [v.image_start_id] + [0] * v.n_queries + [v.image_start_id + 1]
    ids += text[n_text // 2 :]
    img = rng.standard_normal((1, v.image_size, v.image_size, 3)).astype(np.float32)
    outs = [generate(m.model, ids, images=img, max_new_tokens=NEW) for m in (f32, q8)]
    same += outs[0] == outs[1]
    k = min(len(outs[0]), len(outs[1]))
    tok_agree.append(np.mean([a == b for a, b in zip(outs[0][:k], outs[1][:k], strict=False)]))
    idx, _ = image_token_index(np.asarray([ids]), v.image_start_id, v.n_queries)
    lg = [
        np.asarray(
            m.model(
                jnp.asarray([ids]),
                images=jnp.asarray(img[None]),
                image_token_index=jnp.asarray(idx),
            ),  # fmt: skip
            np.float32,
        )
        for m in (f32, q8)
    ]
    rel.append(float(np.abs(lg[1] - lg[0]).max() / np.abs(lg[0]).max()))
print(
    json.dumps(
        {
            "prompts": N,
            "new_tokens": NEW,
            "identical_generations": same / N,
            "mean_token_agreement": float(np.mean(tok_agree)),
            "max_rel_logit_diff": max(rel),
            "median_rel_logit_diff": float(np.median(rel)),
        }
    )
)
