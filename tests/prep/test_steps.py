"""The step framework: counts of the three step shapes, seeded streams, progress lines."""

import json
import logging

import pytest

from qwenvl_jax.prep import runner
from qwenvl_jax.prep.steps import Context, Drop, Step, run_steps


def _records(n):
    return [{"key": str(i), "v": i} for i in range(n)]


def test_counts_of_record_batch_and_whole_shard_steps():
    def odd_only(rec, ctx):
        if rec["v"] % 2 == 0:
            raise Drop("even")
        if rec["v"] == 5:
            ctx.count("five")
        yield rec

    def split_threes(rec, ctx):  # 3 becomes two records, 7 none (a drop without a reason)
        if rec["v"] != 7:
            yield from [rec] * (2 if rec["v"] == 3 else 1)

    def batch(recs, ctx):
        assert len(recs) <= 2
        return [Drop("big") if r["v"] > 8 else [r] for r in recs]

    def first_two(recs, ctx):
        return recs[:2]

    ctx = Context("s", 0)
    st = [Step("odd", odd_only), Step("split", split_threes), Step("batch", batch, batch_size=2),
          Step("first", first_two, whole_shard=True, drop_reason="late")]  # fmt: skip
    out = list(run_steps(st, iter(_records(11)), ctx))
    assert [r["v"] for r in out] == [1, 3]
    c = ctx.counters
    assert c["odd"] == {"in": 11, "out": 5, "dropped": {"even": 6}, "five": 1}
    assert c["split"] == {"in": 5, "out": 5, "dropped": {"dropped": 1}}  # 1 3 3 5 9
    assert c["batch"] == {"in": 5, "out": 4, "dropped": {"big": 1}}
    assert c["first"] == {"in": 4, "out": 2, "dropped": {"late": 2}}


def test_rng_is_a_function_of_seed_and_shard():
    draw = [Context(s, seed).rng.integers(1 << 30, size=4).tolist()
            for s, seed in [("a", 0), ("a", 0), ("b", 0), ("a", 1)]]  # fmt: skip
    assert draw[0] == draw[1] and draw[0] != draw[2] and draw[0] != draw[3]


def test_progress_lines_count_and_eta(tmp_path, caplog):
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.jsonl"
        p.write_text("".join(json.dumps({"v": k}) + "\n" for k in range(4)))
        paths.append(str(p))

    def keep(rec, ctx):
        yield rec

    with caplog.at_level(logging.INFO, logger="qwenvl_jax.prep"):
        runner.run([Step("keep", keep)], paths, str(tmp_path / "out"))
    lines = [r.getMessage() for r in caplog.records if "shards (" in r.getMessage()]
    assert len(lines) == 3
    assert lines[0].startswith("prep: 1/3 shards (s0) | 4 records in, 4 kept |")
    assert "ETA 00:00:0" in lines[0] and lines[2].endswith("ETA 00:00:00")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwenvl_jax.prep"):
        runner.run([Step("keep", keep)], paths, str(tmp_path / "out"))
    assert "3 shards, 3 already done, 0 to run (inprocess)" in caplog.text


def test_duplicate_shard_names_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "00000.jsonl").write_text("")
    with pytest.raises(ValueError, match="both have the name '00000'"):
        runner.run([], [str(tmp_path / "a" / "00000.jsonl"), str(tmp_path / "b" / "00000.jsonl")],
                   str(tmp_path / "out"))  # fmt: skip
