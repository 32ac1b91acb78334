"""A.1 step 3: the CLIP score of a pair and its dataset-specific threshold, batched.

The score is the cosine similarity of the image's and the text's normalised embeddings (the value
LAION, COYO and DataComp publish as "similarity" / "clip score"). `OpenClipScorer` computes it with
`open_clip` (the maintained OpenCLIP implementation; `pip install torch open_clip_torch`, see
docs/prep.md), by default ViT-bigG-14 `laion2b_s39b_b160k`, the model
Qwen-VL's ViT is initialised from; weights come from `pretrained` (a tag open_clip downloads, or a
local checkpoint file). A record that already carries a score under `score_field` is not scored
again (LAION's metadata has one; so has a previous run's output).

The filter is a `steps.Step` with `batch_size`: the scorer sees up to that many pairs at once.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from qwenvl_jax.errors import optional_import
from qwenvl_jax.prep.steps import Context, Drop


class Scorer(Protocol):
    def __call__(self, images: Sequence[bytes], texts: Sequence[str]) -> np.ndarray:
        """float [N] cosine similarities of N (encoded image, text) pairs."""


class OpenClipScorer:
    """CLIP scores with an open_clip model, built on first use (so it pickles to Beam workers as
    its names only and each worker loads it once).

    Args:
      model: an open_clip model name (`ViT-bigG-14`, or a config added with
        `open_clip.add_model_config`).
      pretrained: a pretrained tag, a local checkpoint path, or None (random weights: tests).
      device: torch device (default: cuda when available, else cpu).
      seed: torch seed used when building a model with random weights.
    """

    def __init__(self, model: str, pretrained: str | None, device: str | None = None, seed=0):
        self.model_name, self.pretrained, self.device, self.seed = model, pretrained, device, seed
        self._model = None

    def __getstate__(self):
        return dict(self.__dict__, _model=None)

    def _load(self):
        torch = optional_import("torch", "torch")
        open_clip = optional_import("open_clip", "torch")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(self.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=self.pretrained, device=self.device
        )
        model.eval()
        self._model = (torch, model, preprocess, open_clip.get_tokenizer(self.model_name))

    def __call__(self, images: Sequence[bytes], texts: Sequence[str]) -> np.ndarray:
        from PIL import Image

        if self._model is None:
            self._load()
        torch, model, preprocess, tokenizer = self._model
        pix = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        tok = tokenizer(list(texts))
        with torch.no_grad():
            im = model.encode_image(pix.to(self.device), normalize=True)
            tx = model.encode_text(tok.to(self.device), normalize=True)
        return (im * tx).sum(-1).float().cpu().numpy()


@dataclasses.dataclass
class ClipFilter:
    """The batched step: scores the pairs that have no score yet, drops those below `threshold`
    (reason `clip_score_below`; a score equal to the threshold is kept), writes the score into
    the record's `score_field`."""

    scorer: Scorer
    threshold: float
    text_field: str = "caption"
    score_field: str = "clip_score"

    def __call__(self, batch: list[dict], ctx: Context) -> list:
        scores: list[float | None] = []
        todo = []
        for i, rec in enumerate(batch):
            s = rec.get(self.score_field)
            ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            scores.append(float(s) if ok else None)
            if not ok:
                todo.append(i)
        if todo:
            got = self.scorer(
                [batch[i]["image"] for i in todo], [batch[i][self.text_field] for i in todo]
            )
            for i, s in zip(todo, np.asarray(got, np.float64).tolist(), strict=True):
                scores[i] = s
            ctx.count("scored", len(todo))
        out: list = []
        for rec, s in zip(batch, scores, strict=True):
            if s < self.threshold:
                out.append(Drop("clip_score_below"))
            else:
                rec[self.score_field] = round(s, 6)
                out.append([rec])
        return out
