"""Files on local disk or in Google Cloud Storage, through one layer (`etils.epath`).

Every path the library and the trainer take (workdirs, checkpoints, data files, image roots,
exports) may be local or `gs://bucket/...`. `etils.epath` gives both one pathlib-like API; for
`gs://` it uses fsspec's `gcsfs` when TensorFlow is absent (`tf.io.gfile` when it is installed), so
`pip install 'qwenvl_jax[gcs]'` is all a gs:// path needs. Orbax checkpoints reach GCS through
TensorStore's own driver and TensorBoard event files through `google-cloud-storage` (both in the
extra); every other file goes through this module.

Object stores have no append and no directories: `makedirs` is a no-op there, and `JsonLines`
rewrites the whole object on each write (the metrics log is small: one line per logged step).
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import shutil
import time
from collections.abc import Callable

import fsspec.config
from etils import epath

from qwenvl_jax.errors import UserError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# gcsfs caches directory listings per process, but Orbax writes its array files through
# TensorStore, behind gcsfs's back: a listing cached before a save (say, "params/ does not exist")
# would still answer after it. Listings are therefore not cached (a user's fsspec config wins).
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an `epath.Path`; a gs:// path without gcsfs installed is a one-line `UserError`."""
    p = os.fspath(p)
    if p.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        if importlib.util.find_spec("tensorflow") is None:  # epath would use tf.io.gfile
            raise UserError(
                f"{p}: gs:// paths need gcsfs: pip install 'qwenvl_jax[gcs]' (or pip install -e"
                " '.[gcs]' in a checkout)"
            )
    return epath.Path(p)


def absolute(p: str | os.PathLike) -> str:
    """Local paths made absolute (Orbax wants them so); URLs unchanged."""
    p = os.fspath(p)
    return p if is_remote(p) else os.path.abspath(p)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` as a string, with `/` for URLs whatever the OS."""
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    """A directory, or on GCS a prefix that holds at least one object."""
    return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
    return path(p).is_file()


def listdir(p: str | os.PathLike) -> list[str]:
    """The names directly under `p`, sorted."""
    return sorted(c.name for c in path(p).iterdir())


def makedirs(p: str | os.PathLike) -> None:
    """Creates `p` and its parents locally; GCS needs no directories (objects make prefixes)."""
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)


def read_bytes(p: str | os.PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes `text` to `p` (replacing it), creating local parent directories."""
    target = path(p)
    makedirs(os.path.dirname(os.fspath(p)) or ".")
    target.write_text(text)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    target = path(p)
    makedirs(os.path.dirname(os.fspath(p)) or ".")
    target.write_bytes(data)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file (either end may be remote) in chunks: a 2 GiB shard is never in memory."""
    makedirs(os.path.dirname(os.fspath(dst)) or ".")
    with path(src).open("rb") as r, path(dst).open("wb") as w:
        shutil.copyfileobj(r, w, 16 * 2**20)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the files under `src` to `dst` (either may be remote); returns the written paths."""
    written = []
    for name in listdir(src):
        s, d = join(src, name), join(dst, name)
        if isdir(s):
            written += copy_tree(s, d)
        else:
            copy_file(s, d)
            written.append(d)
    return written


class JsonLines:
    """An append-only text log (`metrics.jsonl`) at a local or gs:// path.

    Locally each `append` appends. GCS objects cannot be appended to, so there the existing
    content is read once and the whole object is rewritten on every `append`.
    """

    def __init__(self, p: str | os.PathLike):
        self.path = os.fspath(p)
        self._remote = is_remote(self.path)
        self._content: str | None = None

    def append(self, line: str) -> None:
        """Adds `line` (a newline is added) to the end of the file."""
        if not self._remote:
            makedirs(os.path.dirname(self.path) or ".")
            with open(self.path, "a") as f:
                f.write(line + "\n")
            return
        if self._content is None:
            target = path(self.path)
            self._content = target.read_text() if target.exists() else ""
        self._content += line + "\n"
        path(self.path).write_text(self._content)


def hold(p: str | os.PathLike, note: str, stop: Callable[[], bool] = lambda: False) -> bool:
    """Writes `note` to the file `p` and waits while `p` exists: a barrier someone else opens.

    Whoever holds the run (a user inspecting it, a test about to kill it) knows it is waiting
    at this exact point while the file is there, and releases it by deleting the file. `stop()` is
    polled too: when it turns True the wait ends and the file is removed, so its disappearance
    also tells the outside that `stop` was seen.

    Returns:
        True when `stop()` ended the wait, False when the file was deleted.
    """
    write_text(p, note)
    while exists(p):
        if stop():
            path(p).unlink(missing_ok=True)
            return True
        time.sleep(0.05)
    return False


__all__ = [
    "JsonLines",
    "absolute",
    "copy_file",
    "copy_tree",
    "exists",
    "hold",
    "is_remote",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "makedirs",
    "path",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
]
