"""qwenvl_jax.tree: dotted paths, flatten/unflatten, and the one "does this tree fit" check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax import tree
from qwenvl_jax.errors import CheckpointError, UserError


def _model_tree():
    return {
        "lm_head": {"kernel": np.zeros((8, 4), np.float32)},
        "transformer": {
            "h": {0: {"attn": {"c_attn": {"kernel": np.zeros((4, 12), np.float32)}}}},
            "ln_f": {"scale": np.ones((4,), np.float32)},
            "wte": {"embedding": np.zeros((8, 4), np.float32)},
        },
    }


def test_path_str_names_dict_keys_indices_and_attributes():
    paths = [path_str for path_str, _ in tree.flatten({"a": [{"b": 1}, (2,)]}).items()]
    assert paths == ["a.0.b", "a.1.0"]
    assert tree.path_str((jax.tree_util.GetAttrKey("x"), jax.tree_util.DictKey("k"))) == "x.k"


def test_flatten_unflatten_round_trip_an_nnx_pure_dict():
    model = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0)) for _ in range(2)])
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = tree.flatten(pure)
    assert list(flat) == ["0.bias", "0.kernel", "1.bias", "1.kernel"]
    back = tree.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(pure)  # int layer keys come back
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(pure), strict=True):
        assert a is b


def test_flatten_of_a_flat_dict_is_itself():
    flat = tree.flatten(_model_tree())
    assert tree.flatten(flat) == flat


def test_unflatten_refuses_a_leaf_that_is_also_a_subtree():
    with pytest.raises(ValueError, match=r"^a\.b is a leaf and a subtree"):
        tree.unflatten({"a.b": 1, "a.b.c": 2})
    with pytest.raises(ValueError, match=r"^a\.b is a leaf and a subtree"):
        tree.unflatten({"a.b.c": 2, "a.b": 1})


def test_map_with_path_passes_dotted_paths_and_keeps_structure():
    out = tree.map_with_path(lambda p, x: p, _model_tree())
    assert (
        out["transformer"]["h"][0]["attn"]["c_attn"]["kernel"]
        == "transformer.h.0.attn.c_attn.kernel"
    )
    assert out["lm_head"]["kernel"] == "lm_head.kernel"


def test_check_fits_accepts_the_same_paths_and_shapes_in_any_leaf_kind():
    want = _model_tree()
    as_jax = jax.tree.map(jnp.asarray, want)
    as_sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), want)
    tree.check_fits(as_jax, as_sds, source="x")  # dtypes are not compared
    tree.check_fits(tree.flatten(want), as_sds, source="x")  # flat or nested alike


def test_check_fits_names_source_and_first_missing_unexpected_misshaped_with_counts():
    want = _model_tree()
    got = tree.flatten(want)
    del got["transformer.ln_f.scale"], got["transformer.wte.embedding"]
    got["foo.bar"] = np.zeros(1)
    got["lm_head.kernel"] = jnp.zeros((8, 3))  # a jax array against numpy
    with pytest.raises(tree.TreeMismatchError) as e:
        tree.check_fits(
            got,
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want),
            source="ckpt/x",
        )
    assert str(e.value) == (
        "ckpt/x: does not fit the model: 2 missing (first transformer.ln_f.scale),"
        " 1 unexpected (first foo.bar), 1 mis-shaped (first lm_head.kernel: (8, 3) vs the"
        " model's (8, 4))"
    )
    assert e.value.missing == ["transformer.ln_f.scale", "transformer.wte.embedding"]
    assert e.value.unexpected == ["foo.bar"]
    assert e.value.misshaped == [("lm_head.kernel", (8, 3), (8, 4))]
    assert e.value.source == "ckpt/x"


@pytest.mark.parametrize(
    "edit, part",
    [
        (lambda t: t.pop("transformer.ln_f.scale"), "1 missing (first transformer.ln_f.scale)"),
        (lambda t: t.update({"x.y": np.zeros(2)}), "1 unexpected (first x.y)"),
        (
            lambda t: t.update({"transformer.ln_f.scale": np.ones(5)}),
            "1 mis-shaped (first transformer.ln_f.scale: (5,) vs this run's (4,))",
        ),
    ],
)
def test_check_fits_lists_only_the_parts_that_differ(edit, part):
    got = tree.flatten(_model_tree())
    edit(got)
    with pytest.raises(tree.TreeMismatchError) as e:
        tree.check_fits(got, _model_tree(), source="d", target="this run", hint="use a new workdir")
    assert str(e.value) == f"d: does not fit this run: {part}; use a new workdir"


def test_a_scalar_against_a_vector_is_misshaped():
    with pytest.raises(tree.TreeMismatchError, match=r"first a: \(\) vs the model's \(1,\)"):
        tree.check_fits({"a": 1.0}, {"a": np.zeros(1)}, source="s")


def test_tree_mismatch_is_a_one_line_user_error():
    # CLIs print UserErrors as one line; callers catching a bad checkpoint catch it too.
    assert issubclass(tree.TreeMismatchError, UserError)
    assert issubclass(tree.TreeMismatchError, CheckpointError)
    assert issubclass(tree.TreeMismatchError, ValueError)
