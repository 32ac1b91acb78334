"""A.1 on hand-made pairs (tests/prep_pairs.py PAIRS): each step drops the pair made for it and
keeps the one at its threshold's edge; the report's counts equal the design; readers, CLI,
resume."""

import collections
import json
import os
import tarfile

import pytest
from prep_pairs import CLEANED, PAIRS, image_bytes, write_tar

from qwenvl_jax.prep import __main__ as prep_main
from qwenvl_jax.prep import pairs, runner, shards, steps


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def laion_run(pair_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pairs_out"))
    cfg = pairs.load_config()
    report = runner.run(
        pairs.build_steps(cfg, "laion_en"), pair_shards, out, mixture={"train": {"task": "caption"}}
    )
    return out, report


def test_each_step_drops_its_pairs_and_keeps_the_edges(laion_run):
    out, report = laion_run
    kept = {r["key"]: r for r in _lines(os.path.join(out, "train.jsonl"))}
    assert sorted(kept) == sorted(k for k, *_, fate in PAIRS if fate == "kept")
    for key, text in CLEANED.items():
        assert kept[key]["caption"] == text
    for key, spec, caption, score, fate in PAIRS:
        if fate == "kept" and key not in CLEANED:
            assert kept[key]["caption"] == caption
            assert kept[key]["clip_score"] == score
            # The image is the original bytes, at the path the line names.
            with open(os.path.join(out, kept[key]["image"]), "rb") as f:
                assert f.read() == image_bytes(spec, key)


def test_removal_counts_equal_the_design(laion_run):
    _, report = laion_run
    design = collections.defaultdict(collections.Counter)
    for *_, fate in PAIRS:
        if fate != "kept":
            design[fate[0]][fate[1]] += 1
    got = {s: c["dropped"] for s, c in report["steps"].items() if c["dropped"]}
    assert got == {s: dict(c) for s, c in design.items()}
    assert report["removed"]["language"] == 3 and report["removed"]["emoji"] == 2
    assert report["records_in"] == len(PAIRS)
    assert report["records_out"] == sum(1 for *_, f in PAIRS if f == "kept")
    # The cleaning steps also count what they changed (kept or not), per pattern.
    assert report["steps"]["html"]["modified"] == 2
    assert report["steps"]["irregular"]["modified"] == 2
    assert report["steps"]["irregular"]["url"] == 1
    assert report["steps"]["irregular"]["camera_name"] == 1
    assert report["steps"]["irregular"]["file_name"] == 1
    # Every step saw what the one before it kept.
    names = list(report["steps"])
    for a, b in zip(names, names[1:], strict=False):
        assert report["steps"][a]["out"] == report["steps"][b]["in"], (a, b)
    with open(os.path.join(out_dir := laion_run[0], "report.json")) as f:
        assert json.load(f) == report
    with open(os.path.join(out_dir, "mixture.json")) as f:
        src = json.load(f)["sources"]["train"]
    assert src["task"] == "caption" and src["path"] == "train.jsonl" and src["kind"] == "json"


def test_special_tags_only_for_the_academic_datasets(tmp_path):
    rows = [
        ("a", (300, 300), "<PERSON> sings on a stage", None, ("special_tags", "special_tag")),
        ("b", (300, 300), "a singer on a stage", None, "kept"),
    ]
    write_tar(tmp_path / "s.tar", rows)
    cfg = pairs.load_config()
    cc = runner.run(
        pairs.build_steps(cfg, "cc12m"), [str(tmp_path / "s.tar")], str(tmp_path / "cc")
    )
    assert cc["steps"]["special_tags"]["dropped"] == {"special_tag": 1}
    assert "clip_score" not in cc["steps"]  # no threshold for cc12m: nothing is scored
    # For a web dataset the step is not in the list (the tag would be cleaned as HTML instead).
    names = [s.name for s in pairs.build_steps(cfg, "laion_en")]
    assert "special_tags" not in names and "clip_score" in names


def test_parquet_input_gives_the_same_lines_as_tar(tmp_path, pair_shards):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = list(shards.read_tar(pair_shards[0]))
    table = pa.table(
        {
            "key": [r["key"] for r in recs],
            "caption": [r["caption"] for r in recs],
            "url": [r["url"] for r in recs],
            "clip_score": [r["clip_score"] for r in recs],
            "png": [r.get("image") for r in recs],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    cfg = pairs.load_config()
    st = pairs.build_steps(cfg, "laion_en")
    runner.run(st, [pair_shards[0]], str(tmp_path / "a"))
    runner.run(st, [str(tmp_path / "00000.parquet")], str(tmp_path / "b"))
    a, b = (
        (tmp_path / "a" / "00000.jsonl").read_text(),
        (tmp_path / "b" / "00000.jsonl").read_text(),
    )
    assert a == b and a.count("\n") >= 5


def test_rerun_skips_finished_shards_and_redoes_a_killed_one(tmp_path, pair_shards):
    cfg = pairs.load_config()
    seen = []

    def crash_on_second(rec, ctx):
        seen.append(ctx.shard)
        if ctx.shard == "00001":
            raise RuntimeError("killed")
        yield rec

    out = str(tmp_path / "o")
    base = pairs.build_steps(cfg, "laion_en")
    with pytest.raises(RuntimeError, match="killed"):
        runner.run([steps.Step("crash", crash_on_second), *base], pair_shards, out)
    assert shards.is_done(out, "00000") and not shards.is_done(out, "00001")
    marker = os.path.join(out, "00000.done.json")
    first = os.stat(marker).st_mtime_ns
    # A killed write left a partial output of shard 00001 (lines, images, no marker).
    (tmp_path / "o" / "00001.jsonl").write_text('{"half": "written"}\n')
    os.makedirs(tmp_path / "o" / "00001", exist_ok=True)
    (tmp_path / "o" / "00001" / "stale.png").write_bytes(b"x")
    seen.clear()
    report = runner.run([steps.Step("crash", _keep), *base], pair_shards, out)
    assert os.stat(marker).st_mtime_ns == first  # not redone
    assert report["steps"]["crash"]["in"] == len(PAIRS)  # the counts still cover both shards
    assert not (tmp_path / "o" / "00001" / "stale.png").exists()
    lines = _lines(tmp_path / "o" / "00001.jsonl")
    assert "half" not in lines[0] and all(
        os.path.exists(tmp_path / "o" / r["image"]) for r in lines
    )
    fresh = str(tmp_path / "fresh")
    assert runner.run(base, pair_shards, fresh)["steps"] == {
        k: v for k, v in report["steps"].items() if k != "crash"
    }
    assert (tmp_path / "o" / "train.jsonl").read_bytes() == (
        tmp_path / "fresh" / "train.jsonl"
    ).read_bytes()


def _keep(rec, ctx):
    yield rec


def test_webdataset_reader_groups_members_by_key(tmp_path):
    write_tar(
        tmp_path / "x.tar", [("a", (10, 10), "one", 0.1, "kept"), ("b", None, "two", 0.2, "")]
    )
    recs = list(shards.read_tar(str(tmp_path / "x.tar")))
    assert [(r["key"], r["caption"], "image" in r) for r in recs] == [
        ("a", "one", True),
        ("b", "two", False),
    ]
    assert recs[0]["clip_score"] == 0.1 and recs[0]["image_ext"] == "png"
    with tarfile.open(tmp_path / "x.tar") as t:
        assert t.getnames()[:3] == ["a.png", "a.txt", "a.json"]


def test_cli_runs_pairs_and_refuses_bad_flags(tmp_path, pair_shards, capsys):
    out = str(tmp_path / "cli")
    rc = prep_main.main(["pairs", f"--input={pair_shards[0]},{pair_shards[1]}", f"--output={out}",
                         "--dataset=laion_en"])  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["records_in"] == len(PAIRS)
    capsys.readouterr()
    for argv, msg in [
        (["pairs", "--input=x.tar", f"--output={out}", "--dataset=a", "--bogus=1"], "unrecognized"),
        (
            ["pairs", f"--input={tmp_path}/none*.tar", f"--output={out}", "--dataset=a"],
            "matches no file",
        ),
        (
            ["pairs", "--input=x.tar", f"--output={out}", "--dataset=a", "--runner=Spark"],
            "--runner",
        ),
        (
            ["pairs", "--input=a.tar", f"--output={out}", "--dataset=a", "--", "--project=p"],
            "need a Beam",
        ),
        (["nope"], "invalid choice"),
    ]:
        assert prep_main.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    bad = tmp_path / "bad.json"
    bad.write_text('{"order": ["image", "colour"]}')
    assert prep_main.main(["pairs", f"--input={pair_shards[0]}", f"--output={out}2",
                           "--dataset=a", f"--config={bad}"]) == 2  # fmt: skip
    assert "colour" in capsys.readouterr().err


def test_gcs_output_matches_local_and_resumes(gcs, pair_shards, tmp_path):
    from qwenvl_jax import fileio

    out = f"gs://{gcs.bucket}/prep/laion_en"
    st = pairs.build_steps(pairs.load_config(), "laion_en")
    local = runner.run(st, pair_shards, str(tmp_path / "local"))
    assert runner.run(st, pair_shards, out) == local
    for name in ("00000.jsonl", "00001.jsonl", "train.jsonl", "report.json"):
        assert fileio.read_bytes(f"{out}/{name}") == (tmp_path / "local" / name).read_bytes()
    for rec in _lines(tmp_path / "local" / "train.jsonl"):
        assert (
            fileio.read_bytes(f"{out}/{rec['image']}")
            == (tmp_path / "local" / rec["image"]).read_bytes()
        )
    fileio.path(f"{out}/00001.done.json").unlink()
    crashed = []

    def count(rec, ctx):
        crashed.append(ctx.shard)
        yield rec

    runner.run([steps.Step("seen", count), *st], pair_shards, out)
    assert set(crashed) == {"00001"}  # only the unfinished shard ran again
