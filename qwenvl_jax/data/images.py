"""Reading images for the pipeline: bytes from local/GCS/HTTP, decoded to an 8-bit RGB PIL image.

Mode conversion (`to_rgb`: the reference's `convert("RGB")`, with 16-bit images scaled to 8 bits),
resizing and CLIP normalisation are `qwenvl_jax.image`'s, so training and inference share one
preprocessing; this module adds GCS reading (`etils.epath`), a minimum size and the skip reasons.
Failures raise `tasks.BadSample` with the counter name: `image_missing`, `image_corrupt`,
`image_too_small`.
"""

from __future__ import annotations

import io
import urllib.request
import warnings
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from qwenvl_jax import image as image_lib
from qwenvl_jax.data.tasks import BadSample

HTTP_TIMEOUT_S = 30


def read_bytes(src: str) -> bytes:
    """The bytes of an image path (local or gs://) or http(s) URL."""
    try:
        if src.startswith(("http://", "https://")):
            with urllib.request.urlopen(src, timeout=HTTP_TIMEOUT_S) as r:  # noqa: S310
                return r.read()
        return epath.Path(src).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadSample("image_missing", f"image not found: {src}") from None
    except OSError as e:
        raise BadSample("image_missing", f"cannot read image {src}: {e}") from None


def decode_image(src: Any, min_side: int = 1) -> tuple[Image.Image, bool]:
    """Decode an image source to 8-bit RGB.

    Args:
      src: a path/URL str, encoded bytes, or a uint8 HxWx3 / HxW array (TFDS decoded images).
      min_side: images with a side shorter than this many pixels raise `image_too_small`.

    Returns:
      (PIL RGB image, converted): converted is True when the mode was not RGB/L (CMYK, palette,
      alpha, 16-bit, ...).
    """
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3):
            raise BadSample("image_corrupt", f"image array {src.dtype}{list(src.shape)} not uint8")
        im = Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src)
        name = "<array>"
    else:
        data = src if isinstance(src, bytes) else read_bytes(src)
        name = "<bytes>" if isinstance(src, bytes) else src
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                im.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt file
            raise BadSample("image_corrupt", f"cannot decode image {name}: {e}") from None
    if min(im.size) < min_side:
        raise BadSample("image_too_small", f"image {name} is {im.size[0]}x{im.size[1]} pixels")
    try:
        return image_lib.to_rgb(im), im.mode not in ("RGB", "L")
    except Exception as e:  # noqa: BLE001
        raise BadSample("image_corrupt", f"cannot convert image {name} ({im.mode}): {e}") from None
