"""Shared fixtures of the data-preparation tests."""

import pytest
from prep_pairs import PAIRS, write_tar


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory):
    """PAIRS split over two tar shards (the duplicate pair in one shard); their paths."""
    d = tmp_path_factory.mktemp("pairs_in")
    half = len(PAIRS) // 2
    paths = [str(d / "00000.tar"), str(d / "00001.tar")]
    write_tar(paths[0], PAIRS[:half])
    write_tar(paths[1], PAIRS[half:])
    return paths
