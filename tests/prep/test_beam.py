"""The same A.1 fixture through Apache Beam's DirectRunner and in-process: byte-identical outputs,
and Beam skips the shards already finished.

Beam is in the `prep` extra only (it needs protobuf < 7 and pyarrow < 26, below constraints.txt),
so CI, which installs the test extra, skips this file; run it with Beam installed."""

import os

import pytest

beam = pytest.importorskip(
    "apache_beam", reason="apache-beam is not installed (the prep extra; it conflicts with the"
    " test extra's protobuf/pyarrow pins)"
)  # fmt: skip

from qwenvl_jax.prep import pairs, runner  # noqa: E402


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            # Done markers hold each shard's wall time; everything else must match byte for byte.
            if not n.endswith(".done.json"):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = f.read()
    return out


def test_direct_runner_matches_in_process_and_resumes(pair_shards, tmp_path):
    cfg = pairs.load_config()
    steps = pairs.build_steps(cfg, "laion_en")
    mix = {"train": {"task": "caption"}}
    a = runner.run(steps, pair_shards, str(tmp_path / "inproc"), seed=3, mixture=mix)
    b = runner.run(steps, pair_shards, str(tmp_path / "beam"), seed=3, mixture=mix,
                   runner="DirectRunner")  # fmt: skip
    assert a == b
    fa, fb = _files(tmp_path / "inproc"), _files(tmp_path / "beam")
    assert sorted(fa) == sorted(fb) and len(fa) > 10
    assert all(fa[k] == fb[k] for k in fa)
    # Beam resumes too: shard 00000 done, only 00001 runs.
    (tmp_path / "beam" / "00001.done.json").unlink()
    marker = tmp_path / "beam" / "00000.done.json"
    before = marker.stat().st_mtime_ns
    c = runner.run(steps, pair_shards, str(tmp_path / "beam"), seed=3, mixture=mix,
                   runner="DirectRunner")  # fmt: skip
    assert c == a and marker.stat().st_mtime_ns == before
    assert _files(tmp_path / "beam") == fa


def test_steps_travel_to_worker_processes(pair_shards, tmp_path):
    # multi_processing pickles the steps (partials, the CLIP filter with its lazy scorer) into
    # other processes, as Dataflow's workers receive them.
    steps = pairs.build_steps(pairs.load_config(), "laion_en")
    a = runner.run(steps, pair_shards, str(tmp_path / "inproc"))
    opts = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    b = runner.run(steps, pair_shards, str(tmp_path / "mp"), runner="DirectRunner",
                   pipeline_args=opts)  # fmt: skip
    assert a == b and _files(tmp_path / "inproc") == _files(tmp_path / "mp")
