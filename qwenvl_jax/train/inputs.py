"""What a run trains and evaluates on: `config.data` / `config.eval` -> the data pipeline.

Three ways to name the data, exactly one per run:

- `--config.data.train=a.json,b.jsonl`: official fine-tuning files (`[{"id", "conversations":
  [{"from": "user", "value": "Picture 1: <img>path</img>\\n..."}, {"from": "assistant", ...}]}]`,
  a JSON list or JSON lines, local or gs://); each file is a `chatml` source and every record is
  equally likely (`weight_by_records`).
- `--config.data.mixture=mixture.json`: the full recipe (configs/data/ has examples):
  `{"sources": {name: {kind, path | name+split+data_dir, task, weight, fields, box_format,
  image_root, options}}, "mixing": ..., ...}` with the keys of `qwenvl_jax.data.pipeline`;
  relative paths resolve against the mixture file's directory; `"comment"` keys are ignored.
  JSON rather than YAML or Python: no new dependency, nothing executed, one error per mistake.
- `config.data.spec` (Python): the pipeline's config itself (the demo's way).

`data.kind="random"` trains on synthetic tokens (`configs/<stage>.py:data=random`); `"auto"` (the
`:tiny` variants) uses the data given, else synthetic tokens; `"pipeline"` (every full-size stage)
stops at start when no data is given. Every mistake is a `ConfigError` / `MissingPathError` naming
the flag, file and entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath

import ml_collections
from etils import epath

from qwenvl_jax.errors import ConfigError, MissingPathError

KINDS = ("pipeline", "random", "auto")
HOW = "--config.data.train=a.json[,b.jsonl] or --config.data.mixture=mixture.json"


def _sources_of(spec) -> dict:
    return dict(spec.get("sources") or {}) if spec else {}


def _exists(path: str) -> bool:
    try:
        return epath.Path(path).exists()
    except Exception:  # noqa: BLE001 - a remote store we cannot ask: the reader reports it
        return True


def _check_file(path: str, what: str) -> None:
    """Raises MissingPathError unless `path` exists and (when local) is a regular file: a FIFO
    would block the reader forever and a device such as /dev/zero never ends."""
    from qwenvl_jax.data.images import local_file_kind

    if not _exists(path):
        raise MissingPathError(f"{what} {path!r} does not exist")
    kind = local_file_kind(path)
    if kind is not None:
        raise MissingPathError(f"{what} {path!r} is {kind}, not a regular file")


def files_spec(files: str, flag: str) -> ml_collections.ConfigDict:
    """The pipeline config of comma-separated official-format files: one chatml source each."""
    from qwenvl_jax.data import pipeline

    paths = [p.strip() for p in str(files).split(",") if p.strip()]
    c = pipeline.default_data_config()
    c.weight_by_records = True
    for i, path in enumerate(paths):
        _check_file(path, f"{flag}:")
        name = posixpath.splitext(posixpath.basename(path))[0] or f"file{i}"
        if name in c.sources:
            name = f"{name}_{i}"
        c.sources[name] = pipeline.source_config(kind="json", path=path, task="chatml")
    return c


def _check_entry(where: str, name: str, entry, root: str) -> dict:
    """One `sources` entry of a mixture file, validated, with relative paths resolved."""
    from qwenvl_jax.data import pipeline, tasks

    at = f"{where}: sources.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{at} is {type(entry).__name__}; it must be an object")
    entry = {k: v for k, v in entry.items() if k != "comment"}
    known = sorted(pipeline.source_config().keys())
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise ConfigError(f"{at}: unknown key(s) {unknown}; valid: {known} (and comment)")
    # The keys a file leaves out take `source_config`'s defaults (written there once).
    given, entry = entry, dict(pipeline.source_config().to_dict(), **entry)
    kind = entry["kind"]
    if kind not in ("json", "tfds"):
        raise ConfigError(f"{at}: kind {kind!r}; valid: json, tfds")
    task = entry["task"]
    if task not in tasks.TASKS:
        raise ConfigError(f"{at}: task {task!r}; valid: {', '.join(tasks.TASKS)}")
    for key in ("path", "name", "split", "data_dir", "image_root", "box_format"):
        if key in entry and not isinstance(entry[key], str):
            raise ConfigError(f"{at}: {key} must be a string, got {entry[key]!r}")

    def resolve(p: str) -> str:
        return p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(root, p))

    if kind == "json":
        if not entry.get("path"):
            raise ConfigError(f"{at}: kind json needs a path (the JSON / JSON-lines file)")
        if entry.get("name"):
            raise ConfigError(f"{at}: name is for kind tfds; a json source has a path")
        entry["path"] = resolve(entry["path"])
        _check_file(entry["path"], f"{at}: path")
    else:
        if not entry.get("name"):
            raise ConfigError(f"{at}: kind tfds needs a name (a TFDS builder: coco_captions)")
        if not given.get("split"):  # explicit, though source_config has a default
            raise ConfigError(f'{at}: TFDS {entry["name"]!r} needs a split (e.g. "train")')
        if entry.get("path"):
            raise ConfigError(f"{at}: path is for kind json; a tfds source has name and split")
        if entry.get("data_dir"):
            entry["data_dir"] = resolve(entry["data_dir"])
    if entry.get("image_root"):
        entry["image_root"] = resolve(entry["image_root"])
    w = entry["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
        raise ConfigError(f"{at}: weight {w!r}; it must be a number > 0")
    fmt = entry["box_format"]
    if fmt not in tasks.BOX_FORMATS:
        raise ConfigError(f"{at}: box_format {fmt!r}; valid: {', '.join(tasks.BOX_FORMATS)}")
    fields = entry["fields"]
    if not isinstance(fields, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    ):
        raise ConfigError(f"{at}: fields must map field names to record keys, got {fields!r}")
    options = entry["options"]
    valid_opts = sorted(f.name for f in dataclasses.fields(tasks.TaskOptions))
    if not isinstance(options, dict) or set(options) - set(valid_opts):
        bad = sorted(set(options) - set(valid_opts)) if isinstance(options, dict) else options
        raise ConfigError(f"{at}: options {bad!r} unknown; valid: {valid_opts}")
    return entry


def load_mixture(path: str, flag: str = "--config.data.mixture") -> ml_collections.ConfigDict:
    """A mixture JSON file, validated, as the pipeline's config (see the module docstring)."""
    from qwenvl_jax.data import pipeline

    where = f"{flag}={path}"
    p = epath.Path(path)
    _check_file(path, f"{flag}: mixture file")
    if p.is_dir():
        raise MissingPathError(f"{flag}: mixture file {path!r} is a directory")
    try:
        # utf-8-sig: a byte-order mark at the start (Windows editors write one) is not an error.
        raw = json.loads(p.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the file must hold a JSON object with 'sources'")
    raw = {k: v for k, v in raw.items() if k != "comment"}
    c = pipeline.default_data_config()
    unknown = sorted(set(raw) - set(c.keys()))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(c.keys())}")
    srcs = raw.pop("sources", None)
    if not isinstance(srcs, dict) or not srcs:
        raise ConfigError(f"{where}: 'sources' must be a non-empty object of named sources")
    choices = {"mixing": ("sample", "sequence"), "too_long": ("truncate", "drop")}
    for k, v in raw.items():
        if k in choices and v not in choices[k]:
            raise ConfigError(f"{where}: {k} {v!r}; valid: {', '.join(choices[k])}")
        try:
            c[k] = v
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {k} {v!r} has the wrong type ({e})") from None
    root = posixpath.dirname(str(path)) or "."
    for name, entry in srcs.items():
        c.sources[name] = pipeline.source_config(**_check_entry(where, name, entry, root))
    return c


def data_spec(files: str, mixture: str, where: str, spec=None):
    """The pipeline config named by a files string (`data.train`), a mixture path or `spec`
    (`where` = "data" or "eval" names the flags); None when none is given; two is an error."""
    files_flag = f"--config.{where}.{'train' if where == 'data' else 'data'}"
    mixture_flag = f"--config.{where}.mixture"
    given = [n for n, v in ((files_flag, files), (mixture_flag, mixture)) if v]
    if _sources_of(spec):
        given.append(f"config.{where}.spec.sources")
    if len(given) > 1:
        raise ConfigError(f"data given twice ({' and '.join(given)}); give one of them")
    if files:
        return files_spec(files, files_flag)
    if mixture:
        return load_mixture(mixture, mixture_flag)
    return spec if _sources_of(spec) else None


def train_spec(cfg):
    """(kind, pipeline config or None) of the run: "pipeline" with its config, or "random"."""
    kind = str(cfg.data.kind)
    if kind not in KINDS:
        raise ConfigError(f"--config.data.kind={kind!r}; valid: {', '.join(KINDS)}")
    d = cfg.data
    spec = data_spec(d.train, d.mixture, "data", d.spec)
    if kind == "random":
        if spec is not None:
            raise ConfigError(
                "--config.data.kind='random' (or :data=random) and data were both given; drop one"
            )
        return "random", None
    if spec is None:
        return ("random", None) if kind == "auto" else ("pipeline", None)
    return "pipeline", spec


def eval_spec(cfg):
    """The held-out data's pipeline config (None: no eval), read in order, repeating."""
    ev = cfg.eval
    spec = data_spec(ev.data, ev.mixture, "eval")
    if spec is None:
        return None
    if int(ev.every_steps) <= 0 or int(ev.batches) <= 0:
        raise ConfigError(
            f"--config.eval.every_steps={ev.every_steps} and --config.eval.batches={ev.batches}"
            " must be > 0 when eval data is given"
        )
    spec.shuffle = False  # the same batches every time
    return spec


def describe(cfg, *, dry_run: bool = False) -> str:
    """The run's first line: what it trains on. Raises ConfigError for a real run with no data
    (a dry run says so and goes on)."""
    kind, spec = train_spec(cfg)
    if kind == "random":
        why = ":tiny with no data given" if cfg.data.kind == "auto" else "data.kind='random'"
        return f"data: RANDOM TOKENS (synthetic batches, {why}; to train on data: {HOW})"
    if spec is None:
        if dry_run:
            return f"data: none given (a real run needs {HOW})"
        stage = cfg.stage or "<stage>"
        raise ConfigError(
            f"no training data given: pass {HOW} (examples in configs/data/), or run"
            f" configs/{stage}.py:data=random for random tokens"
        )
    from qwenvl_jax.data import pipeline

    filled = {n: pipeline.source_config(**s) for n, s in _sources_of(spec).items()}
    line = "data: " + ", ".join(
        f"{n} ({s.task}, {s.path or s.name}, weight {float(s.weight):g})" for n, s in filled.items()
    )
    if spec.get("weight_by_records"):
        line += " [weights x records]"
    ev = eval_spec(cfg)
    if ev is not None:
        names = ", ".join(str(s.get("path") or s.get("name")) for s in _sources_of(ev).values())
        every, n = cfg.eval.every_steps, cfg.eval.batches
        line += f"; eval every {every} steps on {n} batches of {names}"
    return line


def _pipeline_iterator(cfg, mcfg, spec, batch_size_per_host: int, seed: int):
    import jax

    from qwenvl_jax.data.pipeline import make_train_iterator
    from qwenvl_jax.tokenizer import load_tokenizer

    # Every <img>...</img> span gets one position per adapter query (256 as published; a smaller
    # model with fewer queries gets a tokenizer with shorter spans).
    tokenizer = load_tokenizer(cfg.data.tokenizer or None, image_span=int(mcfg.visual.n_queries))
    return make_train_iterator(
        spec,
        tokenizer,
        seq_len=int(cfg.data.seq_len),
        batch_size_per_host=batch_size_per_host,
        image_size=int(cfg.data.image_size),
        max_images=int(cfg.data.max_images),
        seed=seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=int(cfg.data.worker_count),
        max_skip_fraction=float(cfg.data.max_skip_fraction),
        skip_check_records=int(cfg.data.skip_check_records),
    )


def make_data_iterator(cfg, mcfg, batch_size_per_host: int):
    """The training batches of this host (`data.batch` contract), random or from the pipeline."""
    import jax

    from qwenvl_jax.data.random_batches import RandomBatches

    kind, spec = train_spec(cfg)
    if kind == "random":
        return RandomBatches(cfg, mcfg, batch_size_per_host, jax.process_index())
    if spec is None:
        describe(cfg)  # raises the one-line "no training data" error
    return _pipeline_iterator(cfg, mcfg, spec, batch_size_per_host, int(cfg.seed))


def make_eval_iterator(cfg, mcfg, batch_size_per_host: int):
    """A fresh iterator over the held-out data from its start (same batches each call), or None."""
    spec = eval_spec(cfg)
    if spec is None:
        return None
    return _pipeline_iterator(cfg, mcfg, spec, batch_size_per_host, 0)
