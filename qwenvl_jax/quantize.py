"""Weight-only int8 (or fp8) for inference: every `layers.Einsum` kernel with per-channel scales.

`QwenVL.from_pretrained(path, quantize="int8")` stores each matrix of the decoder, the visual
tower and the adapter (every `layers.Einsum` / `layers.Linear`, `lm_head` included) as symmetric
absmax int8 with one float32 scale per output channel (`kernel_scale`: the maximum over the
contracted axes of the kernel / 127), decoded inside the layer, so one layer's full-precision
kernel exists at a time. `quantize="fp8"` is the same with float8_e4m3fn codes (absmax / 448).
Embeddings, norms, biases and the position tables keep the model dtype. The weights are quantized
on the host before they are placed on the devices, so the full-precision model never sits on a
device: Qwen-VL's 9.6B parameters take 10.3 GB (int8 matrices, bfloat16 `wte`; counted from the
abstract model, vs 19.3 GB in bfloat16).

The codecs, the layer's variant slot and the walker are `qwenvl_jax.model.variants` (shared with
LoRA / Q-LoRA); this module is the inference entry: which layers, which modes.
"""

from __future__ import annotations

from flax import nnx

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.model import variants

MODES = ("int8", "fp8")


def convert_modules(model: nnx.Module, mode: str) -> dict[tuple, tuple[variants.Codec, tuple]]:
    """Store every Einsum of an (abstract) model with codec `mode`, in place; returns the plan
    that `quantize_params` fills: module path -> (codec, scale shape).

    The kernels become `mode`'s code Params and each layer gains a float32 `kernel_scale` Param
    whose logical axis names are the kernel's with the contracted axes unnamed (they are size 1).

    Raises:
      ConfigError: `mode` is not one of MODES.
    """
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r} is not supported; choose from {MODES} or None")
    codec = variants.CODECS[mode]
    plan = {}
    for _, path, layer in list(variants.find(model)):
        variants.set_codec(layer, codec, encode=False)
        plan[path] = (codec, tuple(getattr(layer, codec.scale_name).shape))
    return plan


def quantize_params(params: dict, plan: dict[tuple, tuple[variants.Codec, tuple]]) -> dict:
    """The pure param dict with each planned `kernel` replaced by codes + `kernel_scale` (host)."""
    return variants.encode_params(params, plan)
