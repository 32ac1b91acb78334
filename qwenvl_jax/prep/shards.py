"""Input shards in, trainer-ready shards out: the readers, the writer and the done markers.

Readers (chosen by the file's extension) yield records with the image as encoded bytes:

- `.tar`: img2dataset's webdataset output: members `<key>.jpg|png|webp` + `<key>.txt` (the caption)
  + `<key>.json` (its metadata: `url`, `width`, `height`, ... merged into the record). Read with
  the standard `tarfile`: the layout is a plain tar grouped by key, and `webdataset` would add a
  dependency for a loop of ten lines.
- `.parquet`: img2dataset's parquet output or any table with an image-bytes column (`jpg`, `png`,
  `webp` or `image`), read with pyarrow; the other columns become record keys (`caption`, `key`,
  `url`, `width`, `height`, ...).
- `.jsonl` / `.json`: records as the trainer reads them (image paths resolved against the file's
  directory and read as bytes), for the A.2 / A.3 converters' inputs and for tests.

The writer stores each kept record of shard `NAME` as one line of `OUT/NAME.jsonl`, its image as
`OUT/NAME/<key>.<ext>` (the original bytes, not re-encoded) and the line's `"image"` as the path
relative to `OUT` (`NAME/<key>.<ext>`): exactly the JSON-lines layout `qwenvl_jax/data/sources.py`
reads. A shard is finished when `OUT/NAME.jsonl` and its marker `OUT/NAME.done.json` (its counts)
exist; both are written to a temporary name and renamed, the marker last, so a killed run leaves
no shard that looks finished but is not.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, MissingPathError, optional_import

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
DONE_SUFFIX = ".done.json"
_KEY_OK = re.compile(r"[A-Za-z0-9._-]+")


def shard_name(path: str) -> str:
    """The shard's name: the input file's name without its extension (`00012.tar` -> `00012`)."""
    base = posixpath.basename(os.fspath(path))
    return base.split(".")[0] or base


def read_tar(path: str) -> Iterator[dict]:
    """Records of an img2dataset webdataset shard, in the tar's order."""
    with fileio.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        rec: dict | None = None
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = posixpath.basename(m.name).partition(".")
            data = tar.extractfile(m).read()
            if rec is not None and rec["key"] != key:
                yield rec
                rec = None
            rec = rec or {"key": key}
            ext = ext.lower()
            if ext in IMAGE_EXTS:
                rec["image"], rec["image_ext"] = data, ext
            elif ext == "txt":
                rec["caption"] = data.decode("utf-8", errors="replace")
            elif ext == "json":
                try:
                    meta = json.loads(data)
                except ValueError:
                    raise ConfigError(f"{path}: member {m.name} is not JSON") from None
                for k, v in meta.items():
                    rec.setdefault(k, v)
        if rec is not None:
            yield rec


def read_parquet(path: str) -> Iterator[dict]:
    """Records of a parquet file with downloaded image bytes (img2dataset's `jpg` column)."""
    pq = optional_import("pyarrow.parquet", "prep")
    with fileio.path(path).open("rb") as f:
        table = pq.read_table(f)
    cols = table.column_names
    img_col = next((c for c in ("jpg", "png", "webp", "image") if c in cols), None)
    if img_col is None:
        raise ConfigError(f"{path}: no image-bytes column (jpg, png, webp or image) in {cols}")
    for i, row in enumerate(table.to_pylist()):
        data = row.pop(img_col)
        rec = {k: v for k, v in row.items() if v is not None}
        rec.setdefault("key", f"{i:09d}")
        if data is not None:
            rec["image"] = data
            rec["image_ext"] = "jpg" if img_col == "image" else img_col
        yield rec


def read_jsonl(path: str) -> Iterator[dict]:
    """Records of a JSON-lines (or JSON list) file; `image` paths become their bytes."""
    text = fileio.read_text(path)
    root = posixpath.dirname(os.fspath(path)) or "."
    if text.lstrip().startswith("["):
        items = json.loads(text)
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as e:
                    raise ConfigError(f"{path} line {n} is not JSON: {e}") from None
    for i, rec in enumerate(items):
        rec = dict(rec)
        rec.setdefault("key", f"{i:09d}")
        img = rec.get("image")
        if isinstance(img, str):
            p = img if fileio.is_remote(img) or os.path.isabs(img) else fileio.join(root, img)
            try:
                rec["image"] = fileio.read_bytes(p)
            except FileNotFoundError:
                raise MissingPathError(f"{path} record {i}: image not found: {p}") from None
            rec["image_ext"] = posixpath.splitext(img)[1].lstrip(".").lower() or "jpg"
        yield rec


READERS = {"tar": read_tar, "parquet": read_parquet, "jsonl": read_jsonl, "json": read_jsonl}


def read_shard(path: str) -> Iterator[dict]:
    """The records of one input shard, by its extension (see the module docstring)."""
    ext = os.fspath(path).rsplit(".", 1)[-1].lower()
    if ext not in READERS:
        raise ConfigError(f"{path}: unknown shard type .{ext}; expected one of {sorted(READERS)}")
    if not fileio.exists(path):
        raise MissingPathError(f"input shard not found: {path}")
    return READERS[ext](path)


# ----------------------------------------------------------------------------------- output
def done_path(out_dir: str, name: str) -> str:
    return fileio.join(out_dir, name + DONE_SUFFIX)


def is_done(out_dir: str, name: str) -> bool:
    """Finished: the shard's JSON lines and its done marker both exist."""
    return fileio.exists(done_path(out_dir, name)) and fileio.exists(
        fileio.join(out_dir, name + ".jsonl")
    )


def read_done(out_dir: str, name: str) -> dict:
    return json.loads(fileio.read_text(done_path(out_dir, name)))


def _atomic_write(path: str, data: bytes) -> None:
    if fileio.is_remote(path):  # an object appears whole or not at all
        fileio.write_bytes(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fileio.write_bytes(tmp, data)
    fileio.path(tmp).replace(path)  # atomic on one file system


def _safe_key(key: str, seen: set) -> str:
    k = str(key)
    if not _KEY_OK.fullmatch(k) or k in (".", ".."):
        k = re.sub(r"[^A-Za-z0-9._-]", "_", k).strip(".") or "x"
    base, n = k, 1
    while k in seen:  # two records with one key must not share an image file
        k, n = f"{base}_{n}", n + 1
    seen.add(k)
    return k


def write_shard(out_dir: str, name: str, records: Iterable[dict], marker: dict) -> int:
    """Writes one finished shard (see the module docstring); returns the number of records.

    `marker` (the shard's counts) is written last, as the done marker. A previous partial output of
    the same shard (a killed run) is replaced.
    """
    fileio.makedirs(out_dir)
    img_dir = fileio.join(out_dir, name)
    # Locally the images go to a temporary directory renamed at the end; an object store has no
    # directories to rename, so there they go to their place (the marker, written last, is what
    # says the shard is finished either way).
    remote = fileio.is_remote(out_dir)
    if remote and fileio.exists(img_dir):
        _remove_tree(img_dir)
    tmp_dir = img_dir if remote else fileio.join(out_dir, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    lines, seen = [], set()
    for rec in records:
        # Keys starting with "_" are the steps' scratch (cached sizes, scores): not written.
        rec = {k: v for k, v in rec.items() if not k.startswith("_")}
        img = rec.pop("image", None)
        ext = rec.pop("image_ext", "jpg")
        if isinstance(img, (bytes, bytearray)):
            fname = f"{_safe_key(rec.get('key', len(lines)), seen)}.{ext}"
            fileio.write_bytes(fileio.join(tmp_dir, fname), bytes(img))
            rec["image"] = f"{name}/{fname}"
        elif img is not None:
            rec["image"] = img
        lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
    if not remote:
        if fileio.exists(img_dir):
            _remove_tree(img_dir)
        if fileio.exists(tmp_dir):
            fileio.path(tmp_dir).rename(img_dir)
    _atomic_write(fileio.join(out_dir, name + ".jsonl"), "".join(x + "\n" for x in lines).encode())
    marker = dict(marker, shard=name, records_out=len(lines))
    _atomic_write(done_path(out_dir, name), json.dumps(marker).encode())  # steps in order
    return len(lines)


def _remove_tree(p: str) -> None:
    if fileio.is_remote(p):
        fileio.path(p).rmtree()
    else:
        shutil.rmtree(p)


def image_size(rec: dict) -> tuple[int, int]:
    """(width, height) of the record's image bytes, read from the header (cached in the record's
    scratch key `_size`). The bytes decide, not img2dataset's metadata: they are what the trainer
    will load (the metadata's `width` / `height` are left as they are)."""
    if "_size" not in rec:
        from PIL import Image

        with Image.open(io.BytesIO(rec["image"])) as im:
            rec["_size"] = im.size
    return rec["_size"]
