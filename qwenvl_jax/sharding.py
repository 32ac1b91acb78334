"""Device meshes, logical-axis rules and the shardings of parameters, optimizer state and batches.

The mesh has three named axes, in this order:
- `data`: pure data parallelism (parameters replicated, batch split);
- `fsdp`: data parallelism whose parameters and optimizer state are also split (ZeRO-3 / FSDP);
- `model`: tensor parallelism (the paper's "model parallelism 2" of Table 8: attention heads, MLP
  width and vocabulary split in two). The batch is split over `data` x `fsdp`. The optimizer state
  is additionally split over `data` (ZeRO-1, the paper's "optimizer sharding"), so it is never
  replicated across data-parallel replicas.

Rules map the model's logical axis names (docs/architecture.md) to mesh axes; they are config data
(`config.sharding.rules`), a list of `(logical_name, mesh_axis | [mesh_axes] | None)`. A mesh axis
is used at most once per array, and only where it divides the dimension; otherwise that dimension
stays unsplit (and `check_no_large_replicated` catches big parameters left fully replicated).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.tree import flatten, path_str

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes. Parameters: see docs/architecture.md; activations: act_*.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("head_dim", None),
    ("qkv", None),
    ("layers", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "model"),
    ("vit_heads", "model"),
    ("patch", None),
    ("channels", None),
    ("queries", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
)


def rules_from_config(rules: Sequence | None) -> tuple[tuple[str, Any], ...]:
    """Normalises config rules (lists from ml_collections) to a tuple of (name, axes) pairs."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} is not a (logical_name, mesh_axes) pair")
        name, axes = item
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"sharding rule {item!r} names mesh axis {a!r}; use {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def mesh_shape(mesh_cfg: Mapping, num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, model) sizes; at most one may be -1 (= the remaining devices)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    desc = lambda: dict(zip(MESH_AXES, sizes, strict=True))  # noqa: E731
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {desc()}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {desc()}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh {desc()} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {desc()} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all), with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception:  # non-TPU topologies without a physical layout: plain order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh(spec: str) -> dict[str, int]:
    """`"fsdp=4,model=2"` -> {"data": 1, "fsdp": 4, "model": 2}: unnamed axes 1, -1 = the rest.

    Raises:
      ConfigError: on an unknown axis, a repeated axis or a size that is not an integer.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or name in seen:
            raise ConfigError(
                f"mesh {spec!r}: {name!r} is not a mesh axis (or is repeated); use {MESH_AXES},"
                " e.g. 'fsdp=4,model=2'"
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"mesh {spec!r}: size of {name!r} is not an integer") from None
        seen.add(name)
    return sizes


def resolve_mesh(mesh: Mesh | str | Mapping | None) -> Mesh | None:
    """A Mesh from a Mesh, a "fsdp=4,model=2" string, a {axis: size} dict, or None (None).

    Raises:
      ConfigError: a bad mesh string, or sizes that do not fit the devices jax sees.
    """
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    sizes = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    try:
        return make_mesh({a: sizes.get(a, 1) for a in MESH_AXES})
    except ValueError as e:
        raise ConfigError(f"{e} (jax sees {len(jax.devices())} devices)") from None


def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axis names under `rules` on `mesh`.

    Each dimension gets the mesh axes of its rule that are unused so far in this array and whose
    product
    divides the dimension; the rest of that rule's axes are dropped for this array.
    """
    if not logical:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        if name is not None and name not in table:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}"
            )
        axes = table.get(name) if name is not None else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        chosen = []
        for a in axes:
            size = mesh.shape[a]
            if a in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[c] for c in chosen) * size) == 0:
                chosen.append(a)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_axes_of_state(state: Any) -> Any:
    """Pure-dict tree of logical axis-name tuples (or None) from an `nnx.State` of Params."""
    from flax import nnx

    def get(v):
        meta = v.get_metadata() if isinstance(v, nnx.Variable) else {}
        names = meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names")
        return tuple(names) if names else None

    return jax.tree.map(
        lambda v: LogicalAxes(get(v)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


class LogicalAxes:
    """A leaf wrapper so tuples of names are not traversed as pytrees."""

    __slots__ = ("names",)

    def __init__(self, names):
        self.names = names

    def __repr__(self):
        return f"LogicalAxes({self.names})"


def param_shardings(abstract: Any, logical: Any, mesh: Mesh, rules) -> Any:
    """NamedSharding tree for parameters (pure dicts of ShapeDtypeStruct and LogicalAxes)."""

    def one(x, lg):
        names = lg.names if isinstance(lg, LogicalAxes) else lg
        return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules))

    return jax.tree.map(one, abstract, logical, is_leaf=lambda x: isinstance(x, LogicalAxes))


def add_zero1(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Adds the `data` axis to the first dimension where it fits, so state is not replicated over
    it."""
    n = mesh.shape["data"]
    flat = [a for p in spec for a in ((p,) if isinstance(p, str) else (p or ()))]
    if n == 1 or "data" in flat or not shape:
        return spec
    parts = list(spec) + [None] * (len(shape) - len(spec))
    for i, dim in enumerate(shape):
        cur = parts[i]
        cur_t = () if cur is None else (cur,) if isinstance(cur, str) else tuple(cur)
        if dim % (math.prod(mesh.shape[a] for a in cur_t) * n) == 0:
            parts[i] = ("data",) + cur_t if cur_t else "data"
            return PartitionSpec(*parts)
    return spec


def opt_state_shardings(abstract_opt: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: a param-shaped leaf follows its parameter (matched by the
    key-path
    suffix) plus ZeRO-1 over `data`; counters and other leaves are replicated."""
    by_path = flatten(params_sharding)

    def one(path, x):
        p = path_str(path)
        parts = p.split(".")
        for i in range(len(parts)):
            s = by_path.get(".".join(parts[i:]))
            if s is not None and len(s.spec) <= len(x.shape):
                return NamedSharding(mesh, add_zero1(s.spec, x.shape, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def device_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStruct under the given shardings."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = s.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


def check_no_large_replicated(
    abstract: Any, shardings: Any, mesh: Mesh, max_bytes: int, allow: Sequence[str] = ()
) -> None:
    """Raises when a parameter larger than `max_bytes` is fully replicated on a mesh that shards
    params.

    Only applies when fsdp x model > 1 (on a pure data-parallel mesh replication is the intent).
    `allow` holds regexes of dotted paths that may be replicated on purpose.
    """
    if mesh.shape["fsdp"] * mesh.shape["model"] == 1:
        return
    bad = []
    rx = [re.compile(a) for a in allow]

    def check(path, x, s):
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        if nbytes > max_bytes and s.is_fully_replicated and not any(r.search(path) for r in rx):
            bad.append(f"{path} {tuple(x.shape)} ({nbytes / 2**20:.1f} MiB)")

    jax.tree_util.tree_map_with_path(lambda p, x, s: check(path_str(p), x, s), abstract, shardings)
    if bad:
        raise ValueError(
            f"parameters over {max_bytes / 2**20:.1f} MiB would be replicated on every device of "
            f"mesh {dict(mesh.shape)} (no logical axis names, no matching rule, or no divisible "
            f"dimension): {bad}. Fix the rules or add the path to config.sharding.allow_replicated."
        )


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
    """Calls `jax.distributed.initialize` for multi-process runs.

    Explicit arguments win; otherwise the env vars QWENVL_COORDINATOR, QWENVL_NUM_PROCESSES and
    QWENVL_PROCESS_ID; otherwise, on a TPU pod (TPU_WORKER_HOSTNAMES lists more than one host),
    JAX's
    auto-detection (also when `auto` is set: TPU pods, SLURM). Returns True if it initialised.
    """
    coordinator = coordinator or os.environ.get("QWENVL_COORDINATOR")
    if num_processes is None and os.environ.get("QWENVL_NUM_PROCESSES"):
        num_processes = int(os.environ["QWENVL_NUM_PROCESSES"])
    if process_id is None and os.environ.get("QWENVL_PROCESS_ID"):
        process_id = int(os.environ["QWENVL_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id as well")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if auto or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()
        return True
    return False
