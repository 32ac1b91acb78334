"""ModelOptions travel whole: one object from the trainer's config or the inference API reaches the
decoder blocks, the ViT and the adapter, and a field added in one place arrives with it."""

import dataclasses

import jax
import pytest
from flax import nnx

from qwenvl_jax import api
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.model import layers
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import QWenAttention, QWenBlock
from qwenvl_jax.model.resampler import MultiheadAttention, Resampler
from qwenvl_jax.model.visual import VisionTransformer, VisualAttention, VisualAttentionBlock
from qwenvl_jax.train import stage_config, state


@dataclasses.dataclass(frozen=True)
class ProbeOptions(ModelOptions):
    """ModelOptions with one more field, declared here and nowhere else."""

    probe: str = "declared once"


# Every module that reads an option keeps the object it was given (`.options`).
HOLDERS = (
    QWenBlock,
    QWenAttention,
    VisionTransformer,
    VisualAttentionBlock,
    VisualAttention,
    Resampler,
    MultiheadAttention,
)


def _holders(model) -> dict[str, nnx.Module]:
    return {
        ".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, HOLDERS)
    }


def assert_options_arrive(model, options):
    """The very `options` object on the model, every decoder block, the ViT and the adapter."""
    assert model.options is options
    assert model.transformer.options is options
    t = model.transformer
    blocks = [t.h] if options.scan_layers else list(t.h)
    towers = {
        "decoder blocks": blocks,
        "decoder attention": [b.attn for b in blocks],
        "ViT": [t.visual, t.visual.transformer],
        "adapter": [t.visual.attn_pool, t.visual.attn_pool.attn],
    }
    for name, modules in towers.items():
        for m in modules:
            assert m.options is options, f"{name}: {type(m).__name__} holds other options"
            assert getattr(m.options, "probe", None) == getattr(options, "probe", None), name
    # Nothing below builds options of its own either (e.g. a ViT block from the dtypes alone).
    found = _holders(model)
    assert {type(m) for m in found.values()} == set(HOLDERS)
    strays = [p for p, m in found.items() if m.options is not options]
    assert not strays, f"modules with options other than the model's: {strays[:5]}"


def test_trainer_passes_the_options_whole():
    cfg = stage_config.load("multitask:tiny")
    options = dataclasses.replace(ProbeOptions.from_config(cfg), probe="from the trainer")
    assert options.scan_layers  # the stacked layout: the blocks are one vmapped module
    s = state.build(cfg, jax.devices()[:1], options=options)
    assert s.options is options
    assert_options_arrive(nnx.merge(s.graphdef, s.state_template), options)


def test_trainer_default_options_come_from_the_config():
    cfg = stage_config.load("multitask:tiny")
    s = state.build(cfg, jax.devices()[:1])
    assert s.options == ModelOptions.from_config(cfg)
    assert_options_arrive(nnx.merge(s.graphdef, s.state_template), s.options)


def test_inference_api_passes_the_options_whole():
    options = ProbeOptions.inference("float32", probe="from the API")
    assert not options.scan_layers  # the per-layer layout: an nnx.List of blocks
    qwen = api.QwenVL.random("tiny", options=options)
    assert_options_arrive(qwen.model, options)
    with pytest.raises(ValueError, match="inside options"):
        api.QwenVL.random("tiny", dtype="float32", options=options)


def test_from_config_reads_the_model_block():
    cfg = stage_config.load("multitask:tiny")
    cfg.model.dtype = "bfloat16"
    cfg.model.remat_llm = "dots"
    cfg.model.remat_vit = "auto"
    cfg.model.attn_impl = "cudnn"
    cfg.model.scan_layers = False
    o = ModelOptions.from_config(cfg)
    assert o.dtype == jax.numpy.bfloat16 and o.param_dtype == jax.numpy.float32
    assert (o.remat, o.vit_remat, o.attn_impl, o.scan_layers) == ("dots", "dots", "cudnn", False)
    assert o.visual_remat == layers.REMAT_AUTO_LADDER[0]  # "auto" not resolved by train.remat
    cfg.model.dtype = "bf16"
    with pytest.raises(ConfigError, match=r"config\.model\.dtype='bf16'"):
        ModelOptions.from_config(cfg)


def test_inference_options_and_checks():
    o = ModelOptions.inference("bfloat16")
    assert o.dtype == o.param_dtype == jax.numpy.bfloat16
    # The reference math: cached decoding takes XLA anyway (attention.resolve).
    assert o.attn_impl == "xla" and ModelOptions().attn_impl == "auto"
    assert ModelOptions(visual_remat="full").vit_remat == "full"
    assert hash(o) == hash(ModelOptions.inference(jax.numpy.bfloat16))  # static in the graphdef
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.remat = "full"
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        ModelOptions(attn_impl="flash")
    with pytest.raises(ValueError, match="remat='some'"):
        ModelOptions(remat="some")
