"""Image preprocessing: the published transform (RGB, PIL bicubic to S×S, /255, CLIP mean/std)."""

import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import image as qimage

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# An independent re-implementation of Pillow's 8-bit resampling (libImaging/Resample.c: bicubic
# a = -0.5, support widened by the downscale factor, 22-bit fixed-point coefficients, horizontal
# then vertical pass with rounding to uint8 in between), written from the algorithm's description.
def _bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _coeffs(in_size, out_size):
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = [_bicubic((x - center + 0.5) / fscale) for x in range(xmin, xmax)]
        total = sum(w)
        w = [v / total for v in w]
        k = [int(v * (1 << 22) + (0.5 if v >= 0 else -0.5)) for v in w]
        rows.append((xmin, k))
    return rows


def _resample_axis0(a, out_size):
    out = np.empty((out_size,) + a.shape[1:], np.uint8)
    for i, (xmin, k) in enumerate(_coeffs(a.shape[0], out_size)):
        acc = np.full(a.shape[1:], 1 << 21, np.int64)
        for j, kj in enumerate(k):
            acc += a[xmin + j].astype(np.int64) * kj
        out[i] = np.clip(acc >> 22, 0, 255)
    return out


def _pil_bicubic_uint8(a, size):
    h = _resample_axis0(a.transpose(1, 0, 2), size).transpose(1, 0, 2)  # horizontal first
    return _resample_axis0(h, size)


def _normalise(u8):
    return (u8.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)


@pytest.fixture
def rgb_array():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)


def test_constant_image_hand_values():
    img = Image.new("RGB", (30, 17), (255, 0, 128))
    x = qimage.load_image(img, 28)
    assert x.shape == (28, 28, 3) and x.dtype == np.float32
    want = [(1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    np.testing.assert_allclose(x[5, 7], want, rtol=1e-6)
    assert math.isclose(float(x[0, 0, 0]), 1.9303361, rel_tol=1e-6)


def test_bicubic_matches_independent_resampler(rgb_array):
    for size in (14, 28, 56):  # downscale, mixed, upscale
        got = qimage.load_image(rgb_array, size)
        want = _normalise(_pil_bicubic_uint8(rgb_array, size))
        np.testing.assert_array_equal(got, want)
    # The check can tell filters apart: bilinear gives other values.
    bilinear = np.asarray(Image.fromarray(rgb_array).resize((14, 14), Image.BILINEAR))
    assert not np.array_equal(_normalise(bilinear), qimage.load_image(rgb_array, 14))


def test_orientation_width_and_height_not_swapped():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :30, 0] = 255  # left half red
    a[:, 30:, 2] = 255  # right half blue
    x = qimage.load_image(a, 28)
    assert x[10, 2, 0] > 1.5 and x[10, 2, 2] < -1.0
    assert x[10, 25, 2] > 1.5 and x[10, 25, 0] < -1.0


def test_all_sources_agree(tmp_path, rgb_array):
    img = Image.fromarray(rgb_array)
    path = tmp_path / "x.png"
    img.save(path)
    ref = qimage.load_image(rgb_array, 28)
    np.testing.assert_array_equal(qimage.load_image(str(path), 28), ref)
    np.testing.assert_array_equal(qimage.load_image(path, 28), ref)
    np.testing.assert_array_equal(qimage.load_image(path.read_bytes(), 28), ref)
    np.testing.assert_array_equal(qimage.load_image(img, 28), ref)
    np.testing.assert_array_equal(qimage.load_image(rgb_array / 255.0, 28), ref)
    stack = qimage.load_images([img, str(path)], 28)
    assert stack.shape == (2, 28, 28, 3)
    assert qimage.load_images([], 28).shape == (0, 28, 28, 3)


def test_modes_convert_to_rgb(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # fully transparent: the reference keeps the colour
    np.testing.assert_array_equal(
        qimage.load_image(rgba, 10), _normalise(np.full((10, 10, 3), (10, 20, 30), np.uint8))
    )
    grey = np.full((10, 10), 77, np.uint8)
    np.testing.assert_array_equal(
        qimage.load_image(grey, 10), _normalise(np.full((10, 10, 3), 77, np.uint8))
    )
    p = Image.new("P", (10, 10))
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.paste(1, (0, 0, 10, 10))
    np.testing.assert_array_equal(
        qimage.load_image(p, 10), _normalise(np.full((10, 10, 3), (200, 100, 50), np.uint8))
    )
    cmyk = Image.new("CMYK", (10, 10), (0, 0, 0, 0))  # no ink: white
    path = tmp_path / "c.jpg"
    cmyk.save(path, quality=100)
    assert qimage.load_image(str(path), 10).min() > 1.5
    sixteen = Image.fromarray(np.full((10, 10), 257 * 128, np.uint16))  # x / 257 = 128
    assert sixteen.mode.startswith("I;16")
    got = qimage.load_image(sixteen, 10)
    np.testing.assert_array_equal(got, _normalise(np.full((10, 10, 3), 128, np.uint8)))
    one_bit = Image.new("1", (10, 10), 1)
    np.testing.assert_array_equal(
        qimage.load_image(one_bit, 10), _normalise(np.full((10, 10, 3), 255, np.uint8))
    )


def test_bad_inputs_have_clear_errors(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        qimage.load_image(str(missing), 28)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="corrupt.png"):
        qimage.load_image(str(corrupt), 28)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        qimage.load_image(str(truncated), 28)
    with pytest.raises(ValueError, match="allow_urls=True"):
        qimage.load_image("https://example.com/a.jpg", 28)
    with pytest.raises(ValueError, match="shape"):
        qimage.load_image(np.zeros((4, 4, 2), np.uint8), 28)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        qimage.load_image(np.full((4, 4, 3), 2.0), 28)
    with pytest.raises(TypeError, match="int"):
        qimage.load_image(5, 28)


REF = os.path.join(os.path.dirname(__file__), "fixtures", "reference")


@pytest.mark.parametrize("case", ["tiny_image2", "wide224_image2"])
def test_bit_identical_to_published_preprocessing(case):
    # pixel_values: what the published visual tower received (torchvision transform), [M, 3, S, S].
    ref = np.load(os.path.join(REF, f"{case}.npz"))["pixel_values"]
    size = ref.shape[-1]
    for name, want in zip(["img_a.png", "img_b.jpg"], ref, strict=True):
        got = qimage.load_image(os.path.join(REF, name), size)
        np.testing.assert_array_equal(got.transpose(2, 0, 1), want)


def test_url_fetch_only_when_allowed(tmp_path):
    import functools
    import http.server
    import threading

    Image.new("RGB", (8, 8), (255, 0, 128)).save(tmp_path / "u.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/u.png"
        with pytest.raises(ValueError, match="allow_urls=True"):
            qimage.load_image(url, 14)
        got = qimage.load_image(url, 14, allow_urls=True)
        np.testing.assert_array_equal(got, qimage.load_image(tmp_path / "u.png", 14))
        with pytest.raises(OSError, match="missing.png.*404"):
            qimage.load_image(url.replace("u.png", "missing.png"), 14, allow_urls=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
