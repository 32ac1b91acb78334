"""How a model is built and run, as one frozen object passed whole to every tower.

`ModelOptions` holds what is not the checkpoint's architecture (`QWenConfig`) but decides how the
same weights are stored and computed: dtypes, stacked layers, rematerialisation and the attention
kernel. `QWenLMHeadModel` hands the one object to the decoder blocks, the ViT and the adapter;
each keeps it as `.options`, so a new option is one field here and one read where it is used.

Built once per product:
  the trainer: `ModelOptions.from_config(cfg)` (the stage config's `model` block);
  inference (`QwenVL`, `generate`, the evaluator, the demo's chat): `ModelOptions.inference(dtype)`;
  tests and tools: `ModelOptions(...)` with the fields they need.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from qwenvl_jax import config as config_lib
from qwenvl_jax.model import layers
from qwenvl_jax.model.attention import IMPLEMENTATIONS

# Inference computes attention with the reference's math (see `ModelOptions.inference`).
INFERENCE_ATTN = "xla"


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model's build and compute options (frozen and hashable: part of the static graph).

    Attributes:
      dtype: compute dtype (bfloat16 on accelerators); norms, softmax, rotary and the loss run in
        float32 whatever it is. A name ("bfloat16") or a dtype.
      param_dtype: parameter storage dtype (a name or a dtype).
      scan_layers: the decoder and ViT blocks are stacked (leading `layers` axis) and run with
        `jax.lax.scan` (one compiled block; the checkpoint layout `checkpoint.stack_layers`).
      remat: the decoder's remat policy, a `layers.REMAT_POLICIES` name.
      visual_remat: the ViT's remat policy; None = the same as `remat`.
      attn_impl: the `model.attention.dot_product_attention` implementation of every attention
        module: "auto" (the platform's fused kernel: splash on TPU, Triton flash / cuDNN on GPU,
        XLA on CPU), "xla" (the reference math), "splash", "pallas_gpu", "cudnn" or "jax".

    The defaults are those of a model built to be trained by hand: float32, unstacked, no remat,
    the fused attention kernel of the platform. The trainer's values come from its config
    (`from_config`), inference's from `inference`.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    visual_remat: str | None = None
    attn_impl: str = "auto"

    def __post_init__(self):
        # Names become scalar types once, here, so every tower sees the same dtype objects.
        object.__setattr__(self, "dtype", config_lib.dtype_from_name(self.dtype, "options.dtype"))
        object.__setattr__(
            self,
            "param_dtype",
            config_lib.dtype_from_name(self.param_dtype, "options.param_dtype"),
        )
        layers.check_remat(self.remat)
        if self.visual_remat is not None:
            layers.check_remat(self.visual_remat)
        if self.attn_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attn_impl={self.attn_impl!r}; choose from {IMPLEMENTATIONS}")

    @property
    def vit_remat(self) -> str:
        """The ViT's remat policy (`visual_remat`, else the decoder's)."""
        return self.remat if self.visual_remat is None else self.visual_remat

    @classmethod
    def inference(cls, dtype: Any = jnp.float32, **overrides: Any) -> ModelOptions:
        """Options for inference (`QwenVL`, generation, evaluation): one dtype for parameters
        and compute, unstacked layers, no remat, and `attn_impl` "xla".

        Why XLA and not "auto": the inference API promises the published model's logits (the
        parity tests compare them with PyTorch's), and the XLA path is the reference math
        (float32 softmax over the full score matrix); the cached decode steps, where generation
        spends its time, take XLA anyway (`attention.resolve`: explicit positions), so a fused
        kernel would only serve the prefill. Pass `attn_impl=` to choose another.

        Args:
          dtype: parameter and compute dtype (a name or a dtype).
          **overrides: any other field.
        """
        dtype = config_lib.dtype_from_name(dtype, "dtype")  # the error names the caller's key
        fields = dict(dtype=dtype, param_dtype=dtype, attn_impl=INFERENCE_ATTN)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_config(cls, cfg: Any) -> ModelOptions:
        """The options of a training config (`train.stage_config.base()`: its `model` block).

        A tower's remat "auto" that `train.remat.resolve` has not replaced (a model built outside
        the trainer's compile ladder) takes the ladder's first rung, `layers.REMAT_AUTO_LADDER[0]`.

        Raises:
          ConfigError: an unknown dtype name, naming its config key.
        """
        m = cfg.model
        return cls(
            dtype=config_lib.dtype_from_name(m.dtype, "config.model.dtype"),
            param_dtype=config_lib.dtype_from_name(m.param_dtype, "config.model.param_dtype"),
            scan_layers=bool(m.scan_layers),
            remat=_first_rung(m.remat_llm),
            visual_remat=_first_rung(m.remat_vit),
            attn_impl=m.attn_impl,
        )


def _first_rung(name: str) -> str:
    return layers.REMAT_AUTO_LADDER[0] if name == "auto" else name
