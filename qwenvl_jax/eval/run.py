"""Run a published benchmark end to end: predictions (resumable), then the script's score.

    from qwenvl_jax.eval.run import evaluate
    evaluate("Qwen-VL", "textvqa_val", data_dir=".", out_dir="eval_out", batch_size=16)

`python -m qwenvl_jax.evaluate` is the command line of the same function. Predictions go to
`<out_dir>/<benchmark>.jsonl`, one JSON line per question (`question_id`, `output`), appended and
flushed batch by batch; a rerun skips the questions already there, so a killed run resumes where
it stopped. A line that cannot be read (cut by a kill, damaged on disk) or that repeats a question
is dropped with one line saying which, and its question asked again: every question once. The
score goes to `<out_dir>/<benchmark>_scores.json`.

Generation follows the eval_mm scripts: the base-model prompt of `benchmarks.read_records` (or
its ChatML form with `chat=True`, `chat.chat_batch`, stopping on `<|im_end|>`), greedy, the
benchmark's max/min_new_tokens, left-padded batches, outputs decoded with special tokens
skipped. ScienceQA is scored by per-choice loss: each choice's target (" A", " B", ...) appended
to the prompt, the mean cross-entropy of its tokens, the lowest wins (`metrics.choice_losses`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.eval import benchmarks, metrics


def _benchmark(name: str) -> benchmarks.Benchmark:
    if name not in benchmarks.BENCHMARKS:
        raise ConfigError(
            f"unknown benchmark {name!r}; choose from: {', '.join(benchmarks.BENCHMARKS)}"
        )
    return benchmarks.BENCHMARKS[name]


def _key(question_id) -> str:
    return json.dumps(question_id)


def read_predictions(path: str, log: Callable[[str], None] | None = None) -> dict[str, object]:
    """question-id key -> output of a predictions file, repaired so that a rerun asks every
    question exactly once.

    A line that is not a JSON object with `question_id` and `output` (bytes damaged on disk, a
    line cut by a kill: the last one, unterminated) is skipped, and a question seen on an earlier
    line is not taken twice; either way the file is rewritten (atomically) with the good lines
    only, so the questions skipped are asked again and appended once. `log` gets one line saying
    how many lines were skipped and which (1-based line numbers).
    """
    done: dict[str, object] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    cut = lines.pop() != b""  # the last piece lacks its newline: a write cut by a kill
    keep, corrupt, repeated = [], [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw.decode("utf-8"))
            key, output = _key(d["question_id"]), d["output"]
        except (ValueError, KeyError, TypeError):  # bad bytes, bad JSON, not a prediction
            corrupt.append(number)
            continue
        if key in done:
            repeated.append(number)
            continue
        done[key] = output
        keep.append(raw + b"\n")
    if cut:
        corrupt.append(len(lines) + 1)
    if corrupt or repeated:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if log is not None:
            parts = [f"{len(corrupt)} unreadable ({_numbers(corrupt)})"] if corrupt else []
            if repeated:
                parts.append(f"{len(repeated)} repeating a question ({_numbers(repeated)})")
            log(
                f"{path}: dropped {' and '.join(parts)} of its {len(lines) + cut} lines; kept"
                f" {len(keep)} predictions, the dropped questions are asked again"
            )
    return done


def _numbers(numbers: list[int], most: int = 20) -> str:
    """`line 3` or `lines 3, 7, 9` (the first `most`, then how many more)."""
    text = ("line " if len(numbers) == 1 else "lines ") + ", ".join(map(str, numbers[:most]))
    return text + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def predict_batch(model, bench: benchmarks.Benchmark, records: Sequence[dict], *, chat: bool,
                  batch_size: int) -> list:  # fmt: skip
    """The outputs of a batch of records: decoded texts, or per-choice losses for ScienceQA."""
    tok = model.tokenizer
    if bench.metric == "choice_loss":
        if chat:
            from qwenvl_jax import chat as chat_lib

            prompts = [chat_lib.make_context(tok, r["prompt"])[1] for r in records]
        else:
            prompts = [tok.encode(r["prompt"]) for r in records]
        rows, lengths, owner = [], [], []
        for i, p in enumerate(prompts):
            for target in records[i]["targets"]:
                t = tok.encode(target)
                rows.append(p + t)
                lengths.append(len(t))
                owner.append(i)
        losses = model.token_losses(rows)
        out = []
        for i in range(len(records)):
            mine = [j for j, o in enumerate(owner) if o == i]
            scores = metrics.choice_losses([losses[j] for j in mine], [lengths[j] for j in mine])
            out.append([float(x) for x in scores])
        return out
    decoding = dict(
        max_new_tokens=bench.max_new_tokens,
        min_new_tokens=bench.min_new_tokens or 0,
        do_sample=False,
        batch_multiple=batch_size,
    )
    if chat:
        from qwenvl_jax import chat as chat_lib

        return chat_lib.chat_batch(model, [r["prompt"] for r in records], decode="eval", **decoding)
    new = model.generate_batch([tok.encode(r["prompt"]) for r in records], **decoding)
    return [tok.decode(ids, skip_special_tokens=True) for ids in new]


def evaluate(
    checkpoint: str,
    benchmark: str,
    data_dir: str,
    out_dir: str,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    chat: bool = False,
    mesh: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    log: Callable[[str], None] = print,
    pause_after: int | None = None,
) -> dict:
    """Predict every (remaining) question of `benchmark`, then score all of them.

    Args:
      checkpoint: an HF Qwen-VL directory, ours, or a training workdir (`convert.checkpoint_kind`).
      benchmark: a `benchmarks.BENCHMARKS` name (the eval_mm `--dataset` names).
      data_dir: the directory holding `data/<dataset>/...` in the published layout; image paths
        in the test files are relative to it.
      out_dir: where `<benchmark>.jsonl` (predictions) and `<benchmark>_scores.json` go.
      batch_size: questions per generation batch (every batch is padded to it: one compilation).
      limit: only the first `limit` questions of the test file.
      chat: wrap prompts in ChatML (Qwen-VL-Chat) and stop on `<|im_end|>`.
      mesh: shard the model, e.g. "fsdp=4,model=2" (`QwenVL.from_pretrained(mesh=...)`).
      dtype, quantize: as `QwenVL.from_pretrained`.
      pause_after: once the file holds this many predictions (flushed), wait while
        `<out_dir>/<benchmark>.paused` exists (delete it to go on): to look at a live run, and
        the tests' barrier before they kill one.

    Returns:
      the scores dict written to `<benchmark>_scores.json` (score None for server-scored splits).
    """
    bench = _benchmark(benchmark)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    test_file = os.path.join(data_dir, bench.test)
    if not os.path.isfile(test_file):
        raise MissingPathError(
            f"{bench.name}: no test file {test_file} (data_dir must hold data/<dataset>/ as the"
            f" eval_mm scripts read it; sources: qwenvl_jax.eval.benchmarks.DATA_SOURCES)"
        )
    from qwenvl_jax import api
    from qwenvl_jax.convert import checkpoint_kind

    try:
        checkpoint_kind(checkpoint)
    except FileNotFoundError as e:
        raise MissingPathError(str(e)) from None
    records = list(benchmarks.read_records(bench, data_dir))
    if limit is not None:
        records = records[:limit]
    os.makedirs(out_dir, exist_ok=True)
    preds_path = os.path.join(out_dir, f"{bench.name}.jsonl")
    done = read_predictions(preds_path, log)
    todo = [r for r in records if _key(r["question_id"]) not in done]
    total = len(records)
    log(f"{bench.name}: {total} questions, {total - len(todo)} already in {preds_path}")
    if todo:
        model = api.QwenVL.from_pretrained(
            checkpoint, dtype, mesh=mesh, quantize=quantize, image_root=data_dir
        )
        start, n0 = time.time(), total - len(todo)
        with open(preds_path, "a", encoding="utf-8") as f:
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                outputs = predict_batch(model, bench, batch, chat=chat, batch_size=batch_size)
                for r, o in zip(batch, outputs, strict=True):
                    f.write(json.dumps({"question_id": r["question_id"], "output": o}) + "\n")
                    done[_key(r["question_id"])] = o
                f.flush()
                os.fsync(f.fileno())
                n = i + len(batch)
                rate = n / (time.time() - start)
                log(
                    f"[{n0 + n}/{total}] {rate:.2f} questions/s, ETA {_eta((len(todo) - n) / rate)}"
                )
                if pause_after is not None and n0 + n - len(batch) < pause_after <= n0 + n:
                    hold = os.path.join(out_dir, f"{bench.name}.paused")
                    log(f"paused after {n0 + n} predictions: delete {hold} to go on")
                    fileio.hold(hold, f"{n0 + n}\n")
    result = {"benchmark": bench.name, "metric": bench.metric, "n": total, "score": None,
              "checkpoint": checkpoint, "chat": chat, "limit": limit}  # fmt: skip
    if bench.metric is not None:
        outputs = [done[_key(r["question_id"])] for r in records]
        result["score"] = benchmarks.score(
            bench, records, outputs, data_dir, subset=limit is not None
        )
    else:
        log(f"{bench.name} has no public answers: submit {preds_path} to its evaluation server")
    with open(os.path.join(out_dir, f"{bench.name}_scores.json"), "w") as f:
        json.dump(result, f, indent=1)
    log(f"{bench.name} {bench.metric}: {result['score']}")
    return result
