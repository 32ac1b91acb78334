"""Qwen-VL image preprocessing (the published `VisionTransformer.image_transform`) in PIL + numpy.

The published transform: open, `convert("RGB")`, PIL bicubic resize to exactly S×S (no aspect
ratio, no crop), scale to [0, 1], normalise with the OpenAI-CLIP mean and std. Float32 arithmetic in
the same order as torchvision's `ToTensor` + `Normalize`, so the result is bit-identical for every
image the published code accepts.

Deliberate differences (both make inputs usable that the reference turns into garbage):
* 16-bit and 32-bit integer greyscale images (`I;16*`, `I`) are scaled to 8 bits (x / 257) before
  the RGB conversion; PIL's own conversion clips them at 255 (nearly all white).
* Modes PIL cannot convert straight to RGB (e.g. `La`) go through RGBA first.

Alpha is dropped as in the reference (no compositing on a background), and EXIF orientation is not
applied (the reference does not apply it either).
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import urllib.request
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from qwenvl_jax import fileio

# OpenAI-CLIP statistics used by the published transform.
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def resolve_path(path: str, root: str | None) -> str:
    """`path` if absolute or a URL (gs://, http://), else `root/path` (the data pipeline's and
    `QwenVL(image_root=...)`'s rule for relative image paths)."""
    if root is None or _URL.match(path) or path.startswith("/"):
        return path
    if _URL.match(root):
        return posixpath.join(root, path)
    return os.path.join(root, path)


def is_url(src: object) -> bool:
    """Whether `src` is an http(s) URL string."""
    return isinstance(src, str) and src.startswith(("http://", "https://"))


def _open(src: ImageSource, allow_urls: bool, timeout: float) -> tuple[Image.Image, str]:
    """A PIL image and a short description of where it came from (for error messages)."""
    if isinstance(src, Image.Image):
        return src, f"PIL image ({src.mode}, {src.size[0]}x{src.size[1]})"
    if isinstance(src, np.ndarray):
        return _from_array(src), f"array {src.dtype}{list(src.shape)}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        name = f"{len(src)} bytes of image data"
        data = bytes(src)
    elif is_url(src):
        if not allow_urls:
            raise ValueError(
                f"image source is a URL ({src}); pass allow_urls=True to fetch it over the network"
            )
        name = src
        try:
            with urllib.request.urlopen(src, timeout=timeout) as r:
                data = r.read()
        except OSError as e:
            raise OSError(f"could not fetch image {src}: {e}") from None
    elif isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        if not fileio.isfile(name):  # local or gs://
            raise FileNotFoundError(f"image file not found: {name}")
        data = fileio.read_bytes(name)
    else:
        raise TypeError(
            f"unsupported image source of type {type(src).__name__}; expected a path, URL, bytes,"
            " PIL image or numpy array"
        )
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: not a valid or complete image ({e})") from None
    return img, name


def _from_array(a: np.ndarray) -> Image.Image:
    """PIL image from uint8 [H, W], [H, W, 1|3|4] or float in [0, 1] of the same shapes."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(
                "float image arrays must hold finite values in [0, 1]"
                f" (got min {np.nanmin(a)}, max {np.nanmax(a)})"
            )
        a = np.round(a.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise ValueError(f"image array dtype must be uint8 or float, got {a.dtype}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of any PIL image (see the module docstring for the two non-reference cases)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.int64)
        a = np.clip(a, 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    try:
        return img.convert("RGB")
    except ValueError:
        return img.convert("RGBA").convert("RGB")


def preprocess(img: Image.Image, image_size: int) -> np.ndarray:
    """The published transform on an RGB PIL image.

    Returns:
      float32 [S, S, 3] (NHWC without N), CLIP-normalised.
    """
    img = img.resize((image_size, image_size), resample=Image.BICUBIC)
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (x - CLIP_MEAN) / CLIP_STD


def load_image(
    src: ImageSource, image_size: int, *, allow_urls: bool = False, timeout: float = 30.0
) -> np.ndarray:
    """Load and preprocess one image exactly as the published Qwen-VL does.

    Args:
      src: a file path, an http(s) URL (only with allow_urls=True), encoded image bytes, a PIL
        image, or a numpy array (uint8, or float in [0, 1]; [H, W], [H, W, 3] or [H, W, 4]).
      image_size: output side S (config.visual.image_size, 448 for Qwen-VL).
      allow_urls: fetch URLs; off by default so that text from users cannot make the library open
        network connections.
      timeout: seconds for a URL fetch.

    Returns:
      float32 [S, S, 3], CLIP-normalised, NHWC.

    Raises:
      FileNotFoundError: a path that does not exist (named in the message).
      ValueError: a file that is not a readable image, a URL without allow_urls, a bad array.
    """
    img, name = _open(src, allow_urls, timeout)
    try:
        rgb = to_rgb(img)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot convert image {name} (mode {img.mode}) to RGB: {e}") from None
    return preprocess(rgb, image_size)


def load_images(
    srcs: Sequence[ImageSource], image_size: int, *, allow_urls: bool = False
) -> np.ndarray:
    """`load_image` for several sources, stacked: float32 [I, S, S, 3] (I may be 0)."""
    if not srcs:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.stack([load_image(s, image_size, allow_urls=allow_urls) for s in srcs])
