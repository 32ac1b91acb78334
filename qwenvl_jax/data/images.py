"""Reading images for the pipeline: bytes from local/GCS/HTTP, decoded to an 8-bit RGB PIL image.

Mode conversion (`to_rgb`: the reference's `convert("RGB")`, with 16-bit images scaled to 8 bits),
resizing and CLIP normalisation are `qwenvl_jax.image`'s, so training and inference share one
preprocessing; this module adds GCS reading (`etils.epath`), a minimum size and the skip reasons.
Failures raise `tasks.BadSample` with the counter name: `image_missing`, `image_corrupt`,
`image_too_small`, `image_not_regular_file` (a FIFO, a device, a directory: opening one could block
forever or never end), `image_too_large` (more than `MAX_IMAGE_BYTES`).
"""

from __future__ import annotations

import io
import os
import stat
import urllib.request
import warnings
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from qwenvl_jax import image as image_lib
from qwenvl_jax.data.tasks import BadSample

HTTP_TIMEOUT_S = 30
# The most bytes read for one encoded image. PIL's decompression-bomb check bounds the pixels; this
# bounds what is read before decoding (a 448 px training image is well under 1 MiB; 64 MiB leaves
# room for large originals that are resized).
MAX_IMAGE_BYTES = 64 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def local_file_kind(path: str) -> str | None:
    """What a local `path` is when it is not a regular file ("a FIFO", "a character device", "a
    directory", ...; "missing" when nothing is there), else None (a regular file, or a URL / remote
    path, whose store holds only objects).

    Asked before opening: opening a FIFO blocks until a writer comes, and reading a device such as
    /dev/zero never ends. `os.stat` follows links, so a link to a regular file is one.
    """
    if "://" in path:
        return None
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _read_capped(f, src: str) -> bytes:
    data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise BadSample("image_too_large", f"image {src} is over {MAX_IMAGE_BYTES >> 20} MiB")
    return data


def check_image_file(src: str) -> None:
    """Raises `BadSample` unless `src` (a local path, gs:// or URL) may be opened as an image."""
    kind = local_file_kind(src)
    if kind == "missing":
        raise BadSample("image_missing", f"image not found: {src}")
    if kind is not None:
        raise BadSample("image_not_regular_file", f"image {src} is {kind}, not a regular file")


def read_bytes(src: str) -> bytes:
    """The bytes of an image path (local or gs://) or http(s) URL, at most `MAX_IMAGE_BYTES`."""
    try:
        if src.startswith(("http://", "https://")):
            with urllib.request.urlopen(src, timeout=HTTP_TIMEOUT_S) as r:  # noqa: S310
                return _read_capped(r, src)
        check_image_file(src)
        with epath.Path(src).open("rb") as f:
            return _read_capped(f, src)
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
