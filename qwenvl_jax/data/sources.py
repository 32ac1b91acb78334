"""Data sources: records from JSON / JSON-lines files and TFDS, turned into `Example`s per task.

A source is one entry of `data_config.sources` (see `pipeline.default_data_config`):

- `kind="json"`: `path` is a JSON file holding a list of records (the official Qwen-VL
  fine-tuning format: `{"id", "conversations": [{"from", "value"}]}`) or a JSON-lines file (one
  record a line), UTF-8 with or without a byte-order mark. Local or `gs://` paths (read through
  `etils.epath`); a local path must be a regular file (a FIFO or a device is refused before it is
  opened). Relative image paths resolve against `image_root`, by default the JSON file's directory.
- `kind="tfds"`: `name` (e.g. `"coco_captions:1.0.0"`), `split`, `data_dir`, read with
  `tfds.data_source` (ArrayRecord; no TensorFlow needed). Image features arrive as encoded bytes.

`fields` maps each canonical field of the task (`image`, `caption`, `question`, `answer`,
`expression`, `boxes`, `refs`, `lines`, `text`, `conversations`, `width`, `height`) to the record's
key; nested keys are dotted (`"objects.bbox"`); a list picks the first element (`"answers[0]"`).

Reading never raises for one bad record: it becomes a `tasks.Skip` carrying the source name, index
and reason, which the packer logs and counts (or `strict=True` raises `DataError` at once).
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import logging
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from etils import epath

from qwenvl_jax.data import images, tasks
from qwenvl_jax.errors import ConfigError, MissingPathError, UserError, optional_import
from qwenvl_jax.image import resolve_path


class DataError(UserError, RuntimeError):
    """The data stops the run: a bad record or image met with `strict=True`, or too many skipped
    records (the message names the source, the record or the counts, and the reason). A user
    error: the trainer prints it as one line and exits 2."""


def get_field(record: Mapping, key: str) -> Any:
    """`record[key]` for a dotted / indexed key such as `objects.bbox` or `answers[0]`."""
    value: Any = record
    for part in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if not m:
            raise tasks.BadSample("bad_field", f"bad field path {key!r}")
        if not isinstance(value, Mapping) or m.group(1) not in value:
            raise tasks.BadSample("missing_field", f"record has no field {key!r}")
        value = value[m.group(1)]
        for idx in re.findall(r"\[(\d+)\]", m.group(2)):
            try:
                value = value[int(idx)]
            except (IndexError, KeyError, TypeError):
                msg = f"record field {key!r} has no such item"
                raise tasks.BadSample("missing_field", msg) from None
    return value


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ----------------------------------------------------------------------------------- readers
class JsonRecords:
    """Random access to the records of a JSON list file or a JSON-lines file.

    A JSON-lines file is split into lines up front and each line parsed on access, so an unreadable
    line costs only its own record (`Skip("bad_record")`).
    """

    def __init__(self, path: str):
        self.path = str(path)
        kind = images.local_file_kind(self.path)
        if kind == "missing":
            raise MissingPathError(f"data file not found: {self.path}")
        if kind is not None:
            raise MissingPathError(f"data file {self.path} is {kind}, not a regular file")
        try:
            data = epath.Path(self.path).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise MissingPathError(f"data file not found: {self.path}") from None
        # Editors on Windows start UTF-8 files with a byte-order mark; json.loads refuses it, which
        # cost the first record of a JSON-lines file and every record of a JSON list.
        data = data.removeprefix(codecs.BOM_UTF8)
        self._items: list | None = None
        self._lines: list[bytes] | None = None
        if data.lstrip()[:1] == b"[":
            try:
                items = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(
                    f"{self.path} is not valid JSON ({e}); a file of one record per line is read"
                    " as JSON lines"
                ) from None
            self._items = items
        else:
            # Lines stay bytes until used: a line that is not UTF-8 costs only its own record.
            self._lines = [ln for ln in data.splitlines() if ln.strip()]
            self._line_no = [n for n, ln in enumerate(data.splitlines(), 1) if ln.strip()]

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self._lines)

    def __getitem__(self, i: int):
        if self._items is not None:
            rec = self._items[i]
        else:
            try:
                rec = json.loads(self._lines[i].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                where = f"{self.path} line {self._line_no[i]}"
                raise tasks.BadSample("bad_record", f"{where} is not JSON: {e}") from None
        if not isinstance(rec, dict):
            where = self.path + (f" line {self._line_no[i]}" if self._items is None else f"[{i}]")
            msg = f"{where}: record is {type(rec).__name__}, not an object"
            raise tasks.BadSample("bad_record", msg)
        return rec


class TfdsRecords:
    """Random access to a TFDS split through `tfds.data_source` (ArrayRecord), images as bytes."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_field: str | None):
        tfds = optional_import("tensorflow_datasets", "tfds")

        decoders = None
        if image_field:
            decoders = {image_field.split(".")[0]: tfds.decode.SkipDecoding()}
        self.name, self.split, self.data_dir = name, split, data_dir
        self._image_field = image_field
        self._src = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int):
        return self._src[i]

    def __getstate__(self):
        return dict(name=self.name, split=self.split, data_dir=self.data_dir, f=self._image_field)

    def __setstate__(self, s):
        self.__init__(s["name"], s["split"], s["data_dir"], s["f"])


# ----------------------------------------------------------------------------------- source
def image_size_of(src: Any) -> tuple[int, int]:
    """(width, height) of an image from its header (path/URL, bytes or HxWxC array)."""
    from PIL import Image

    if isinstance(src, np.ndarray):
        return int(src.shape[1]), int(src.shape[0])
    try:
        if isinstance(src, bytes):
            with Image.open(io.BytesIO(src)) as im:
                return im.size
        images.check_image_file(src)
        with epath.Path(src).open("rb") as f, Image.open(f) as im:
            return im.size
    except FileNotFoundError:
        raise tasks.BadSample("image_missing", f"image not found: {src}") from None
    except tasks.BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error is a corrupt image
        msg = f"cannot read image header of {src!r}: {e}"
        raise tasks.BadSample("image_corrupt", msg) from None


class Source:
    """One named source: record reader + task format; `source[i]` is an `Example` or a `Skip`.

    Args:
      name: the source's name (used in logs, counters and mixture weights).
      cfg: the source's config entry (kind, path / name+split+data_dir, task, fields, box_format,
        image_root, options).
      tokenizer: the tokenizer.
      strict: raise `DataError` for a bad record instead of returning a `Skip`.
    """

    def __init__(self, name: str, cfg: Mapping, tokenizer, strict: bool = False):
        self.name = name
        self.task = cfg["task"]
        if self.task not in tasks.TASKS:
            raise ValueError(
                f"source {name!r}: unknown task {self.task!r}; choose from {tasks.TASKS}"
            )
        self.strict = strict
        self.tokenizer = tokenizer
        fields = dict(cfg.get("fields") or {})
        self.fields = fields
        opts = dict(cfg.get("options") or {})
        if cfg.get("box_format"):
            opts["box_format"] = cfg["box_format"]
        self.opts = tasks.TaskOptions(**opts)
        kind = cfg.get("kind", "json")
        if kind == "json":
            self.records = JsonRecords(cfg["path"])
            root = cfg.get("image_root") or posixpath.dirname(str(cfg["path"])) or "."
            self.label = f"data file {cfg['path']}"
        elif kind == "tfds":
            image_field = None
            if self.task not in ("text", "chatml"):
                image_field = fields.get("image", "image")
            split = cfg.get("split", "train")
            self.records = TfdsRecords(cfg["name"], split, cfg.get("data_dir"), image_field)
            root = cfg.get("image_root")
            self.label = f"TFDS {cfg['name']}[{split}]"
        else:
            raise ValueError(f"source {name!r}: unknown kind {kind!r} (json or tfds)")
        self.image_root = root

    def __len__(self) -> int:
        return len(self.records)

    def _canonical(self, rec: Mapping) -> dict:
        if not self.fields:
            return dict(rec)
        out = {k: v for k, v in rec.items()}
        for canon, key in self.fields.items():
            try:
                out[canon] = get_field(rec, key)
            except tasks.BadSample:
                if canon not in ("width", "height"):
                    raise
        return out

    def _example(self, i: int) -> tasks.Example:
        rec = self._canonical(self.records[i])
        rec = {k: _jsonable(v) if k != "image" else v for k, v in rec.items()}
        kw: dict = {}
        if self.task == "chatml":
            kw["image_base"] = functools.partial(resolve_path, root=self.image_root)
        elif self.task != "text":
            img = rec.get("image")
            if img is None:
                raise tasks.BadSample("missing_field", "record has no image")
            if isinstance(img, str):
                kw["image_tag"] = img
                kw["image_src"] = resolve_path(img, self.image_root)
            elif isinstance(img, (bytes, np.ndarray)):
                # In-record images: the text between <img> and </img> is only a name (the model
                # reads the features from image_token_index, never these bytes).
                kw["image_tag"] = f"{self.name}/{i}"
                kw["image_src"] = img
            else:
                raise tasks.BadSample("bad_field", f"image field is {type(img).__name__}")
            kw["image_size_fn"] = image_size_of
        return tasks.make_example(
            self.tokenizer, self.task, rec, opts=self.opts, source=self.name, index=i, **kw
        )

    def __getitem__(self, i: int) -> tasks.Example | tasks.Skip:
        try:
            return self._example(i)
        except tasks.BadSample as e:
            if self.strict:
                raise DataError(f"source {self.name!r} record {i}: {e}") from None
            return tasks.Skip(self.name, i, e.reason, e.message)
        except Exception as e:  # noqa: BLE001 - one bad record must never end a run
            if self.strict:
                raise DataError(f"source {self.name!r} record {i}: {type(e).__name__}: {e}") from e
            logging.exception("data: unexpected error in %s[%d]", self.name, i)
            return tasks.Skip(self.name, i, "other", f"{type(e).__name__}: {e}")


def source_dataset(source: Source, *, seed: int, shuffle: bool, num_epochs: int | None):
    """A grain MapDataset of `Example | Skip` over `num_epochs` epochs (None: forever), each epoch
    shuffled with its own seed when `shuffle`."""
    ds = grain.MapDataset.range(len(source))
    if len(source) == 0:
        raise ConfigError(f"data source {source.name!r} holds no records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    return ds.map(source.__getitem__)
