"""`config.mesh.model = "auto"`: tensor parallelism only where the step needs it to fit.

Table 8 trains stages 2 and 3 with model parallelism 2. On TPU that axis costs synchronous
all-reduces in every decoder layer, and the 7B multi-task step fits a v5p-64 without it with the
same remat policy (docs/performance.md, "Tensor parallelism on TPU": 64 -> 26 synchronous
collectives, 36.3 -> 48.5 of 88.5 GiB, remat dots both), while on a v6e-64 dropping it needs a
heavier remat policy (full instead of save_attn). So "auto", the 7B stage configs' default, is:
- 1 where the train step with model = 1 fits the device memory with a remat policy no heavier
  than the one model = 2 needs;
- else 2 (Table 8; `--config.mesh.model=2` pins it, any integer is taken as given).

It is decided once, by the trainer's compile-to-fit loop (`train.remat.resolve`, which owns the
compiles and the memory bound, and which both `train()` and `--dry_run` build their setup with);
the value is logged there ("config.mesh.model=auto: ...") and the run's config holds the integer.
What it costs, where:
- no device memory to fit against (a CPU without `config.model.remat_fit_gib`): 1, nothing
  compiled: there is nothing to weigh, and 1 divides every device count;
- a TPU slice (a run, or an AOT topology) or a GPU, whose memory is known: model = 1 is compiled
  first, at the lightest remat policy allowed, and that compiled step is the one the run uses;
  more steps are compiled only when it does not fit (then model = 2 at that policy, then the next
  policy for both). v5p-64: one compile; v6e-64: four (dots and save_attn for each);
- one size only fits the devices and the batch (one device, an odd count, an explicit fsdp
  size): that size, no compile for the choice;
- the tiny configs set model = 1 (`stage_config.tiny`): nothing to decide.
Where nothing compiles (a setup built directly with `train.build`, the dry run that lays a named
slice out abstractly) "auto" is laid out as its first choice, 1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import ml_collections

from qwenvl_jax import sharding as shd
from qwenvl_jax.errors import ConfigError

AUTO = "auto"
# In order of preference: 1 has no per-layer all-reduces over the model axis; 2 is Table 8's.
CHOICES = (1, 2)


def field(value: int | str = AUTO) -> ml_collections.FieldReference:
    """A `config.mesh.model` entry that takes an integer or "auto" (ml_collections otherwise
    fixes a field's type at its first value, and `--config.mesh.model=2` must still give 2)."""
    return ml_collections.FieldReference(value, field_type=object)


def is_auto(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.mesh.model == AUTO


def with_model(cfg: ml_collections.ConfigDict, model: int) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose model axis is `model`."""
    c = copy.deepcopy(cfg)
    c.mesh.model = model
    return c


def _sizes(cfg: ml_collections.ConfigDict, model: int) -> dict:
    return {**{a: cfg.mesh[a] for a in shd.MESH_AXES}, "model": model}


def choices(cfg: ml_collections.ConfigDict, num_devices: int) -> list[int]:
    """The model axis sizes a run of `cfg` on `num_devices` devices may take, in order of
    preference: `[cfg.mesh.model]` when it is an integer; for "auto", those of `CHOICES` whose
    mesh fills the devices (`train.validate.model_axes` also asks that the batch split over it).

    Raises:
      ConfigError: "auto" and no choice fits (each one's reason named).
    """
    if not is_auto(cfg):
        return [int(cfg.mesh.model)]
    out, why = [], []
    for m in CHOICES:
        try:
            shd.mesh_shape(_sizes(cfg, m), num_devices)
        except ValueError as e:
            why.append(f"model={m}: {e}")
            continue
        out.append(m)
    if not out:
        raise ConfigError(
            f"--config.mesh.model=auto: no model axis of {CHOICES} fits the {num_devices}"
            f" devices of this run ({'; '.join(why)})"
        )
    return out


def mesh_sizes(cfg: ml_collections.ConfigDict, devices: Sequence | int) -> dict:
    """`cfg.mesh` for `sharding.make_mesh` on `devices` (or that many): "auto" as its first
    choice (`choices`), where nothing compiles to decide.

    Raises:
      ConfigError: "auto" and no choice fits the devices and the batch.
    """
    n = devices if isinstance(devices, int) else len(devices)
    return _sizes(cfg, choices(cfg, n)[0]) if is_auto(cfg) else _sizes(cfg, cfg.mesh.model)
