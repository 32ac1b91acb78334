"""Hand-made A.1 pairs as img2dataset shards, for tests/prep (its conftest builds them once).

`PAIRS` is the design: each pair says which step must drop it (and why) or that it is kept, and
the pairs at a threshold's edge say so in their name. The shards are webdataset tars written
the way img2dataset writes them (`<key>.jpg`, `<key>.txt`, `<key>.json`).
"""

import io
import json
import tarfile

from PIL import Image

LONG_512 = ("a long description of a dog " * 20)[:511] + "x"  # 512 characters, no edge spaces
assert len(LONG_512) == 512 and LONG_512 == LONG_512.strip()

# (key, (width, height) or bytes or None, caption, clip score, expected: "kept" or (step, reason))
PAIRS = [
    ("k_plain", (300, 300), "a dog on the grass", 0.5, "kept"),
    ("k_aspect_edge", (672, 224), "a wide panorama of hills", 0.5, "kept"),  # ratio exactly 3
    ("d_aspect", (675, 224), "a wider panorama of hills", 0.5, ("aspect_ratio", "aspect_ratio")),
    ("k_small_edge", (224, 300), "a tall photo of a tower", 0.5, "kept"),  # shorter side 224
    ("d_small", (223, 300), "a small photo of a tower", 0.5, ("min_size", "too_small")),
    ("k_clip_edge", (300, 300), "a cat on a sofa", 0.28, "kept"),  # score == threshold
    ("d_clip", (300, 300), "a cat on a chair", 0.2799, ("clip_score", "clip_score_below")),
    ("k_len_min", (300, 300), "a dog", 0.5, "kept"),  # 5 characters
    ("d_len_min", (300, 300), "a do", 0.5, ("text_length", "too_short")),  # 4 characters
    ("k_len_max", (300, 300), LONG_512, 0.5, "kept"),
    ("d_len_max", (300, 300), LONG_512 + "y", 0.5, ("text_length", "too_long")),
    ("k_zh", (300, 300), "一只狗在草地上奔跑", 0.5, "kept"),
    ("k_zh_en", (300, 300), "Beijing 北京 at night, 2023", 0.5, "kept"),
    ("d_ru", (300, 300), "собака на траве", 0.5, ("language", "not_english_or_chinese")),
    (
        "d_accent",
        (300, 300),
        "café au lait on a table",
        0.5,
        ("language", "not_english_or_chinese"),
    ),
    ("d_ja", (300, 300), "犬とねこ in a park", 0.5, ("language", "not_english_or_chinese")),
    ("k_symbol", (300, 300), "\u00a9 a photo of a tree", 0.5, "kept"),  # (c) is not an emoji
    ("d_emoji", (300, 300), "a happy dog \U0001f600", 0.5, ("emoji", "emoji")),
    ("d_emoji_vs", (300, 300), "I \u2764\ufe0f my dog", 0.5, ("emoji", "emoji")),
    ("k_html", (300, 300), "<b>a red car</b> &amp; a road", 0.5, "kept"),
    ("d_html", (300, 300), "<img src='a.png'><br/>", 0.5, ("html", "empty_after_html")),
    ("k_irregular", (300, 300), "a cat http://x.com/a.jpg IMG_1234", 0.5, "kept"),
    ("d_irregular", (300, 300), "DSC_00123.JPG", 0.5, ("irregular", "empty_after_patterns")),
    ("d_no_image", None, "a lost image", 0.5, ("image", "no_image")),
    ("d_corrupt", b"not an image at all", "a broken image", 0.5, ("image", "image_corrupt")),
    ("k_dup_long", "dup", "a brown dog running on wet sand", 0.5, "kept"),
    ("d_dup_short", "dup", "a dog on sand", 0.5, ("longest_text", "shorter_text")),
]
# What the kept texts become after cleaning.
CLEANED = {"k_html": "a red car & a road", "k_irregular": "a cat"}


def image_bytes(spec, key: str) -> bytes | None:
    """PNG bytes for a (w, h) spec (colour from the key, so images differ), the given bytes, or
    one shared image for "dup"."""
    if spec is None or isinstance(spec, bytes):
        return spec
    size, colour = ((320, 240), (10, 120, 30)) if spec == "dup" else (spec, None)
    colour = colour or tuple(b % 256 for b in key.encode()[-3:].ljust(3, b"x"))
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, pairs) -> None:
    """An img2dataset-style webdataset shard of `pairs` (PAIRS rows)."""
    with tarfile.open(path, "w") as tar:
        for key, spec, caption, score, _ in pairs:
            img = image_bytes(spec, key)
            meta = {"key": key, "url": f"http://example.com/{key}.png", "clip_score": score}
            members = [(f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
            if img is not None:
                members.insert(0, (f"{key}.png", img))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
