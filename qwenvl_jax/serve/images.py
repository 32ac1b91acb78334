"""Images of a request: `image_url` sources read into the engine's preprocessed `ImageInput`.

A source is a `data:image/...;base64,...` URL, an `http(s)://` URL, or (only when the server was
started with `--allowed_local_dir`) a local path or `file://` URL inside that directory. Every way a
source can be bad is one `APIError` naming the request field: bad base64, a fetch that fails, bytes
that are not an image, more bytes or pixels than the limits (a decompression bomb is refused from
its header, before any pixel is decoded), a path outside the allowed directory.

The pixels are prepared by `qwenvl_jax.image` (the published transform); the engine's cache key is
the sha256 of the original bytes, so the engine encodes an image sent twice once. `DecodedImages`
keeps the decoded images too (by the sha256 of a data: URL's text, and of the bytes read for the
other sources), so an image sent again also skips its base64, PNG/JPEG decoding and resizing: on a
CPU those cost more than the tokens of a short answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
import os
import threading
import urllib.parse
import warnings

from PIL import Image, UnidentifiedImageError

from qwenvl_jax import image as image_lib
from qwenvl_jax.serve.engine import LRU, ImageInput
from qwenvl_jax.serve.errors import APIError, bad_request


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What one image may be.

    Attributes:
      max_bytes: encoded size (data: URL after base64, a download, a file).
      max_pixels: width x height; larger images are refused from their header (decompression
        bombs: a few kB of PNG that would decode to gigabytes).
      allowed_local_dir: local paths and file:// URLs are read only inside this directory; None
        refuses them.
      fetch_timeout_s: seconds for an http(s) download.
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    allowed_local_dir: str | None = None
    fetch_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """An image ready for the engine, with its original size (for pixel boxes)."""

    input: ImageInput
    width: int
    height: int


def _describe(src: str) -> str:
    return src if len(src) <= 80 else src[:60] + "..." + f" ({len(src)} characters)"


def _decode_data_url(src: str, param: str) -> bytes:
    head, sep, payload = src.partition(",")
    if not sep:
        raise bad_request(f"{param}: data URL has no ',' before its payload", param, "invalid_url")
    if not head.endswith(";base64"):
        raise bad_request(
            f"{param}: only base64 data URLs are supported (data:image/...;base64,...)",
            param,
            "invalid_url",
        )
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(
            f"{param}: invalid base64 in data URL ({e})", param, "invalid_base64"
        ) from None


def _local_path(src: str, limits: ImageLimits, param: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlparse(src).path) if src.startswith("file:") else src
    if limits.allowed_local_dir is None:
        raise bad_request(
            f"{param}: local image paths are disabled (start the server with"
            " --allowed_local_dir); send a data: or http(s):// URL",
            param,
            "local_path_refused",
        )
    root = os.path.realpath(limits.allowed_local_dir)
    full = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root
    if os.path.commonpath([root, full]) != root:
        raise bad_request(
            f"{param}: {_describe(src)} is outside the allowed directory {root}",
            param,
            "local_path_refused",
        )
    if not os.path.isfile(full):
        raise bad_request(f"{param}: image file not found: {_describe(src)}", param, "not_found")
    if os.path.getsize(full) > limits.max_bytes:
        raise _too_big(param, os.path.getsize(full), limits)
    with open(full, "rb") as f:
        return f.read()


def _too_big(param: str, n: int, limits: ImageLimits) -> APIError:
    return APIError(
        413,
        f"{param}: image is larger than {limits.max_bytes} bytes ({n} bytes or more)",
        param=param,
        code="image_too_large",
    )


async def _fetch(client, url: str, limits: ImageLimits, param: str) -> bytes:
    import httpx

    try:
        async with client.stream(
            "GET", url, timeout=limits.fetch_timeout_s, follow_redirects=True
        ) as r:
            if r.status_code != 200:
                raise bad_request(
                    f"{param}: fetching {_describe(url)} answered HTTP {r.status_code}",
                    param,
                    "image_fetch_failed",
                )
            data = bytearray()
            async for chunk in r.aiter_bytes():
                data.extend(chunk)
                if len(data) > limits.max_bytes:
                    raise _too_big(param, len(data), limits)
            return bytes(data)
    except httpx.HTTPError as e:
        raise bad_request(
            f"{param}: could not fetch {_describe(url)}: {type(e).__name__}: {e}",
            param,
            "image_fetch_failed",
        ) from None


async def read_source(src: str, limits: ImageLimits, param: str, client=None) -> bytes:
    """The encoded bytes of an image source (see the module docstring).

    Args:
      src: the URL or path the client sent.
      limits: size limits and the allowed local directory.
      param: the request field, for messages ("messages[0].content[1].image_url.url").
      client: an `httpx.AsyncClient` for http(s) URLs (None refuses them).
    """
    if not isinstance(src, str) or not src:
        raise bad_request(f"{param}: empty image URL", param, "invalid_url")
    if src.startswith("data:"):
        data = _decode_data_url(src, param)
    elif image_lib.is_url(src):
        if client is None:
            raise bad_request(f"{param}: http(s) image URLs are disabled", param, "invalid_url")
        data = await _fetch(client, src, limits, param)
    elif "://" in src and not src.startswith("file://"):
        scheme = src.split("://", 1)[0]
        raise bad_request(
            f"{param}: unsupported URL scheme {scheme!r}; use data:, http(s):// or a local path",
            param,
            "invalid_url",
        )
    else:
        data = await asyncio.to_thread(_local_path, src, limits, param)
    if len(data) > limits.max_bytes:
        raise _too_big(param, len(data), limits)
    return data


class DecodedImages:
    """Decoded images by the sha256 of their source, least recently used out past `max_mb` MiB
    of pixels (`engine.LRU` under a lock: looked up on the event loop and in the decoding
    threads)."""

    def __init__(self, max_mb: float):
        self._lru = LRU(int(max_mb * 2**20), size=lambda img: img.input.pixels.nbytes)
        self.hits = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> LoadedImage | None:
        with self._lock:
            img = self._lru.get(key)
            self.hits += img is not None
            return img

    def put(self, key: str, img: LoadedImage) -> None:
        with self._lock:
            self._lru.put(key, img)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()  # releases the GIL on large inputs


def decode(
    data: bytes,
    image_size: int,
    limits: ImageLimits,
    param: str,
    cache: DecodedImages | None = None,
) -> LoadedImage:
    """Encoded bytes to the engine's input (CPU work: call it off the event loop); from `cache`
    when the same bytes were decoded before.

    Raises:
      APIError: not an image (400 invalid_image), more than `limits.max_pixels` (400
        image_too_large, checked from the header before decoding).
    """
    key = hashlib.sha256(data).hexdigest()
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below) is the check; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise bad_request(
                    f"{param}: image is {w}x{h} = {w * h} pixels, more than the limit of"
                    f" {limits.max_pixels}",
                    param,
                    "image_too_large",
                )
            img.load()
            pixels = image_lib.preprocess(image_lib.to_rgb(img), image_size)
    except Image.DecompressionBombError as e:
        raise bad_request(f"{param}: {e}", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        what = "not an image" if isinstance(e, UnidentifiedImageError) else f"unreadable ({e})"
        head = data[:16]
        raise bad_request(
            f"{param}: {len(data)} bytes starting {head!r} are {what}", param, "invalid_image"
        ) from None
    pixels.flags.writeable = False  # shared by every request that sends these bytes
    img = LoadedImage(ImageInput(key=key, pixels=pixels), w, h)
    if cache is not None:
        cache.put(key, img)
    return img


async def load(
    src: str,
    image_size: int,
    limits: ImageLimits,
    param: str,
    client=None,
    cache: DecodedImages | None = None,
) -> LoadedImage:
    """`read_source` then `decode` (in a worker thread); a data: URL seen before comes from
    `cache` without either."""
    url_key = None
    if cache is not None and src.startswith("data:"):
        url_key = "url:" + await asyncio.to_thread(_sha256, src)
        if (hit := cache.get(url_key)) is not None:
            return hit
    data = await read_source(src, limits, param, client)
    img = await asyncio.to_thread(decode, data, image_size, limits, param, cache)
    if url_key is not None:
        cache.put(url_key, img)
    return img
