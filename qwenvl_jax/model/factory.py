"""The one model factory and checkpoint loader: the trainer, the inference API, the evaluator, the
demo and the benchmark all build and load their Qwen-VL here.

  make_model(cfg, options, rngs, lora=None)   a freshly initialised QWenLMHeadModel
  load_params(path, scan_layers)              (config, params) from any checkpoint kind
  build_model(cfg, params, options, ...)      a model holding given (or random) weights, on a mesh

Why here and not in `api`: the trainer builds and loads its model too, and it must not import the
inference facade for it (docs/architecture.md, "Arrows").
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import config as config_lib
from qwenvl_jax import sharding as shd
from qwenvl_jax import tree
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwenvl import QWenLMHeadModel


def make_model(
    cfg: config_lib.QWenConfig, options: ModelOptions, rngs: nnx.Rngs, lora=None
) -> QWenLMHeadModel:
    """A freshly initialised QWenLMHeadModel (call it under `nnx.eval_shape` for its structure).

    Args:
      cfg: the model config (the architecture).
      options: the `ModelOptions`, passed whole to the model.
      rngs: the initialisers' random streams (LoRA adapters draw from them too).
      lora: a `config.lora` block with rank > 0, or None: its adapters attached, the base
        kernels first quantized to 4 bits when it sets `quantize_base` (`qwenvl_jax.lora`).
    """
    model = QWenLMHeadModel(cfg, options, rngs=rngs)
    if lora is not None:
        from qwenvl_jax import lora as lora_lib

        lora_lib.quantize_kernels(model, lora.quantize_base)
        lora_lib.add_adapters(model, lora, rngs)
    return model


def load_params(path: str, scan_layers: bool = False) -> tuple[config_lib.QWenConfig, dict]:
    """(config, pure nested param dict) from any supported checkpoint (`convert.checkpoint_kind`):
    a training workdir's latest step, our format, or HF weights (converted in memory); the
    layers per-layer, or stacked when `scan_layers`."""
    from qwenvl_jax import convert

    kind = convert.checkpoint_kind(path)
    if kind == "workdir":
        from qwenvl_jax import checkpoint

        return checkpoint.latest_params(path, scan_layers=scan_layers)
    if kind == "ours":
        return convert.load_params(path, scan_layers=scan_layers)
    return convert.import_hf(path, scan_layers=scan_layers)


def random_params(abstract: dict, std: float, seed: int) -> dict:
    """HF-style random weights in numpy (fast on CPU): N(0, std), zero biases, unit norm scales."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return std * rng.standard_normal(leaf.shape, dtype=np.float32)

    return jax.tree_util.tree_map_with_path(init, abstract)


def build_model(
    cfg: config_lib.QWenConfig,
    params: dict | None,
    options: ModelOptions,
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    quantize: str | None = None,
    source: str = "the given parameters",
) -> QWenLMHeadModel:
    """A QWenLMHeadModel holding `params` (cast to the options' param_dtype), or random weights
    when params is None.

    With a mesh, each parameter goes from host memory straight to its shards (the training rules,
    `sharding.DEFAULT_RULES`: embed over fsdp; heads, MLP and vocabulary over model), so a model
    larger than one device's memory never sits whole on one device. `quantize="int8"` stores every
    matrix as int8 with per-channel scales, quantized on the host (`qwenvl_jax.quantize`).

    Args:
      cfg: the model config.
      params: a pure nested dict fitting the model (`load_params`), or None.
      options: the `ModelOptions` (inference: `ModelOptions.inference(dtype)`).
      seed: the random weights' seed (params None).
      mesh: place the parameters on this mesh; None: the default device.
      quantize: a `quantize.MODES` name ("int8", "fp8") or None.
      source: where `params` came from, for the error when they do not fit.

    Raises:
      tree.TreeMismatchError: params do not fit the model (naming `source`).
    """
    abstract = nnx.eval_shape(lambda: make_model(cfg, options, nnx.Rngs(seed)))
    want = nnx.to_pure_dict(nnx.state(abstract))
    if params is None:
        params = random_params(want, cfg.initializer_range, seed)
    tree.check_fits(params, want, source=source)
    if quantize is not None:
        from qwenvl_jax import quantize as quant_lib

        # On the host, before placement: the full-precision matrices never reach a device.
        params = quant_lib.quantize_params(params, quant_lib.convert_modules(abstract, quantize))
    graphdef, state = nnx.split(abstract)
    want = nnx.to_pure_dict(state)
    # Each leaf keeps its abstract dtype: param_dtype, or int8 / float32 for quantized kernels /
    # scales.
    np_dtypes = jax.tree.map(lambda x: np.dtype(x.dtype), want)
    if mesh is None:
        cast = jax.tree.map(lambda a, d: jnp.asarray(np.asarray(a).astype(d)), params, np_dtypes)
    else:
        logical = nnx.to_pure_dict(shd.logical_axes_of_state(state))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
        shardings = shd.param_shardings(abstract, logical, mesh, shd.DEFAULT_RULES)
        # Large matrices left whole on every device would defeat the mesh (a rule or shape bug).
        shd.check_no_large_replicated(abstract, shardings, mesh, 64 * 2**20)
        logging.info(
            "parameters: %.3f GiB per device", shd.device_bytes(abstract, shardings) / 2**30
        )
        cast = jax.tree.map(
            lambda a, d, sh: jax.device_put(np.asarray(a).astype(d), sh),
            params,
            np_dtypes,
            shardings,
        )
    nnx.replace_by_pure_dict(state, cast)
    return nnx.merge(graphdef, state)
