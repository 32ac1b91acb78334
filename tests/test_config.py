"""Config presets against the published Qwen-VL config.json values (spec section 1)."""

import json

import pytest

from qwenvl_jax import config as cfg_lib

# The published Qwen-VL-Chat config.json, written out by hand from the reference facts (spec 1.1).
PUBLISHED = {
    "architectures": ["QWenLMHeadModel"],
    "attn_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "bf16": False,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 22016,
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": False,
    "use_logn_attn": True,
    "visual": {
        "heads": 16,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 48,
        "mlp_ratio": 4.9231,
        "output_dim": 4096,
        "patch_size": 14,
        "width": 1664,
    },
    "vocab_size": 151936,
}


def test_published_config_values_and_derived_fields():
    c = cfg_lib.from_hf_dict(PUBLISHED)
    assert c == cfg_lib.get_preset("qwen-vl-7b")
    assert c.mlp_width == 11008  # intermediate_size // 2 (QWenMLP)
    assert c.visual.mlp_width == 8192  # int(1664 * 4.9231)
    assert c.visual.resampler_heads == 32  # output_dim // 128
    assert c.visual.head_dim == 104
    assert c.visual.grid_size == 32 and c.visual.num_patches == 1024
    assert (c.visual.image_end_id, c.visual.image_pad_id) == (151858, 151859)


def test_export_reproduces_published_keys_exactly(tmp_path):
    cfg_lib.get_preset("qwen-vl-7b").save_hf_json(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    softmax = written.pop("softmax_in_fp32")  # an extra key the reference config class also accepts
    assert softmax is False
    assert written == PUBLISHED


def test_non_default_derived_fields_round_trip(tmp_path):
    tiny = cfg_lib.get_preset("tiny").replace(mlp_width=100, visual={"n_queries": 64})
    tiny.save_hf_json(str(tmp_path))
    back = cfg_lib.load_hf_json(str(tmp_path))
    assert back == tiny
    assert json.loads((tmp_path / "config.json").read_text())["visual"]["n_queries"] == 64


def test_bad_configs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="kv_channels"):
        cfg_lib.get_preset("tiny").replace(kv_channels=32)
    with pytest.raises(ValueError, match="output_dim"):
        cfg_lib.get_preset("tiny").replace(visual={"output_dim": 128})
    with pytest.raises(KeyError, match="unknown model preset"):
        cfg_lib.get_preset("qwen-vl-70b")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        cfg_lib.load_hf_json(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen", "hidden_size": 8}))
    with pytest.raises(ValueError, match="visual"):
        cfg_lib.load_hf_json(str(tmp_path))
