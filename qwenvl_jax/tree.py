"""Parameter trees: dotted paths, flattening, and the one "does this tree fit the model" check.

Every parameter tree in the package is a pure nested dict (`nnx.to_pure_dict` of a model's Param
state, a converted checkpoint, an Orbax restore); its leaves may be numpy arrays, jax arrays,
`jax.ShapeDtypeStruct`s or Orbax metadata. A leaf is named by its dotted path, e.g.
`transformer.h.0.attn.c_attn.kernel` (unstacked layers) or `transformer.h.attn.c_attn.kernel`
(stacked for `nnx.scan`). This module is the one owner of those names and of the question whether
one tree fits another: the converters, the API, the trainer's init sources and the training
checkpointer all ask it, so a mismatch reads the same wherever it is found.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from qwenvl_jax.errors import CheckpointError


class TreeMismatchError(CheckpointError):
    """A parameter (or optimizer-state) tree that does not fit the one it must replace.

    The message names the source and the first missing, unexpected and mis-shaped paths with
    their counts; the full lists are kept as attributes for callers that want them.

    Attributes:
      source: the file, directory or description the tree came from.
      missing: paths the target has and the tree lacks, in the target's order.
      unexpected: paths the tree has and the target lacks, in the tree's order.
      misshaped: (path, shape in the tree, shape in the target), in the target's order.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "",
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        misshaped: Sequence[tuple[str, tuple, tuple]] = (),
    ):
        super().__init__(message)
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshaped = list(misshaped)


def path_str(key_path: Sequence[Any]) -> str:
    """The dotted string of a pytree key path (dict keys, sequence indices, attribute names)."""
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
    """{dotted path: leaf} in the tree's leaf order (None subtrees hold no leaves).

    A mapping whose keys are already dotted paths flattens to itself, so every function here
    takes a nested or a flat tree alike.
    """
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The nested dict of a {dotted path: leaf} mapping; the inverse of `flatten` for pure dicts.

    A path segment of digits becomes an int key, as NNX writes the index of a layer in a list
    (`transformer.h.0...`), so `unflatten(flatten(t)) == t` for an `nnx.to_pure_dict` tree.

    Raises:
      ValueError: one path is a prefix of another (a leaf and a subtree at the same place).
    """
    out: dict = {}
    for path, leaf in flat.items():
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = out
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'.'.join(map(str, keys[: i + 1]))} is a leaf and a subtree")
        if keys[-1] in node:
            raise ValueError(f"{path} is a leaf and a subtree")
        node[keys[-1]] = leaf
    return out


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`jax.tree.map` whose function receives the dotted path string and the leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The shape of a numpy or jax array, a ShapeDtypeStruct, Orbax metadata or a scalar."""
    return tuple(int(d) for d in np.shape(leaf))


def check_fits(
    got: Any, want: Any, *, source: str, target: str = "the model", hint: str = ""
) -> None:
    """Raise unless `got` has exactly `want`'s paths and shapes (dtypes are not compared).

    Args:
      got: the tree read from `source` (nested or flat; any leaves with a shape).
      want: the tree it must fit, e.g. the model's abstract parameters.
      source: the file, directory or description `got` came from; the message starts with it.
      target: what `want` is, for the message ("the model", "this run").
      hint: a sentence appended to the message (what to do about it).

    Raises:
      TreeMismatchError: one line, e.g. "ckpt/x: does not fit the model: 2 missing (first
        transformer.ln_f.scale), 1 unexpected (first foo.bar), 1 mis-shaped (first
        lm_head.kernel: (8, 3) vs the model's (8, 4))".
    """
    err = _compare(got, want, source=source, target=target)
    if err is not None:
        if hint:
            err.args = (f"{err.args[0]}; {hint}",)
        raise err


def _compare(got: Any, want: Any, *, source: str, target: str) -> TreeMismatchError | None:
    g, w = flatten(got), flatten(want)
    missing = [p for p in w if p not in g]
    unexpected = [p for p in g if p not in w]
    misshaped = [
        (p, shape_of(g[p]), shape_of(x))
        for p, x in w.items()
        if p in g and shape_of(g[p]) != shape_of(x)
    ]
    if not (missing or unexpected or misshaped):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if misshaped:
        p, gs, ws = misshaped[0]
        parts.append(f"{len(misshaped)} mis-shaped (first {p}: {gs} vs {target}'s {ws})")
    return TreeMismatchError(
        f"{source}: does not fit {target}: {', '.join(parts)}",
        source=source,
        missing=missing,
        unexpected=unexpected,
        misshaped=misshaped,
    )


__all__ = [
    "TreeMismatchError",
    "check_fits",
    "flatten",
    "map_with_path",
    "path_str",
    "shape_of",
    "unflatten",
]
