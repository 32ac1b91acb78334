"""Frozen model configs whose field names are the HF `config.json` keys of Qwen-VL.

Values the published code hard-codes (256 resampler queries, resampler heads = output_dim // 128,
decoder MLP width = intermediate_size // 2, the 16x16 learned ViT position table) are explicit
fields here whose defaults reproduce the reference, so tiny test models are possible.
Presets: `qwen-vl-7b` and `tiny`.

Every field is checked against `BOUNDS` when a config is made (from a `config.json`, a preset, or
the trainer's overrides), before anything is allocated from it: a hand-edited or hostile config
(`num_hidden_layers` = 10^7, `visual.image_size` = 10^6, a string where a number belongs) is one
`ConfigError` line naming the field, not minutes of allocation; the file readers prefix the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import stat
from typing import Any

import ml_dtypes
import numpy as np

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError

# Dtype names accepted wherever a dtype is named (configs, flags, the API): one table.
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def dtype_from_name(name: Any, key: str = "dtype"):
    """The numpy/JAX scalar type of a dtype name (or a dtype, passed through).

    Raises:
        ConfigError: naming `key` and the valid names.
    """
    if not isinstance(name, str):
        return np.dtype(name).type
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r}: unknown dtype; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Bound:
    """The values a config field may hold: its kind and an inclusive (or open) numeric range."""

    kind: type  # int, float (an int is accepted) or bool
    low: float = 0
    high: float = 0
    open_low: bool = False  # low itself is out (a positive float such as an epsilon)
    open_high: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{what} in {left}{_num(self.low)}, {_num(self.high)}{right}"

    def holds(self, value: Any) -> bool:
        if self.kind is bool:
            return isinstance(value, bool | np.bool_)
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, numbers.Integral if self.kind is int else numbers.Real
        ):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


def _num(x: float) -> str:
    """A bound as written in a message: 2097152, not 2.09715e+06; 1e+09 stays short."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e8 else f"{x:g}"


def _ints(low: int, high: int) -> Bound:
    return Bound(int, low, high)


# Generous bounds (the published 9.6B model is far inside each): they stop a config that would
# allocate without end, not an unusual model. Layer counts may be 0 (a tower alone, FLOP counts).
BOUNDS = {
    "vocab_size": _ints(1, 2**21),
    "hidden_size": _ints(1, 65536),
    "num_hidden_layers": _ints(0, 1024),
    "num_attention_heads": _ints(1, 1024),
    "kv_channels": _ints(1, 4096),
    "intermediate_size": _ints(2, 2**21),  # the MLP is intermediate_size // 2 wide
    "mlp_width": _ints(1, 2**20),
    "rotary_emb_base": Bound(float, 1, 1e9, open_low=True),
    "rotary_pct": Bound(float, 0, 1, open_low=True),
    "layer_norm_epsilon": Bound(float, 0, 1, open_low=True, open_high=True),
    "no_bias": Bound(bool),
    "tie_word_embeddings": Bound(bool),
    "seq_length": _ints(2, 2**20),  # logn attention divides by log(seq_length)
    "max_position_embeddings": _ints(1, 2**20),
    "use_dynamic_ntk": Bound(bool),
    "use_logn_attn": Bound(bool),
    "use_flash_attn": Bound(bool),
    "scale_attn_weights": Bound(bool),
    "emb_dropout_prob": Bound(float, 0, 1, open_high=True),
    "attn_dropout_prob": Bound(float, 0, 1, open_high=True),
    "initializer_range": Bound(float, 0, 10),
    "visual.heads": _ints(1, 1024),
    "visual.image_size": _ints(1, 4096),
    "visual.image_start_id": _ints(0, 2**21),
    "visual.layers": _ints(0, 1024),
    "visual.mlp_ratio": Bound(float, 0, 64, open_low=True),
    "visual.output_dim": _ints(1, 65536),
    "visual.patch_size": _ints(1, 1024),
    "visual.width": _ints(1, 65536),
    "visual.n_queries": _ints(1, 4096),
    "visual.resampler_heads": _ints(1, 1024),
    "visual.mlp_width": _ints(1, 2**20),
    "visual.pos_grid_size": _ints(1, 1024),
    "visual.layer_norm_epsilon": Bound(float, 0, 1, open_low=True, open_high=True),
}


def check_bounds(values: dict, prefix: str = "") -> None:
    """Checks the fields present in `values` (a config dict or section) against `BOUNDS`.

    Args:
      values: field name -> value; names without a bound, and None (a derived field left to its
        rule), are not checked.
      prefix: "visual." for the visual section.

    Raises:
      ConfigError: the first field outside its bound, as `<field>=<value> is not <bound>`.
    """
    for name, value in values.items():
        bound = BOUNDS.get(prefix + name)
        if bound is not None and value is not None and not bound.holds(value):
            raise ConfigError(f"{prefix}{name}={value!r:.80} is not {bound.describe()}")


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# Keys of the published config.json that only describe the PyTorch wrapper; kept verbatim on export.
AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}


@dataclasses.dataclass(frozen=True)
class VisualConfig:
    """`config.visual`: the ViT-bigG encoder and the position-aware adapter (Resampler)."""

    heads: int = 16
    image_size: int = 448
    image_start_id: int = 151857
    layers: int = 48
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    patch_size: int = 14
    width: int = 1664
    # Hard-coded in the reference; explicit here. None means "derive as the reference does".
    n_queries: int = 256
    resampler_heads: int | None = None  # output_dim // 128
    mlp_width: int | None = None  # int(width * mlp_ratio)
    pos_grid_size: int = 16  # the learned 16x16 positional_embedding, resized per forward
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        check_bounds(_fields(self), "visual.")  # before anything is derived from the values
        if self.resampler_heads is None:
            object.__setattr__(self, "resampler_heads", self.output_dim // 128)
        if self.mlp_width is None:
            object.__setattr__(self, "mlp_width", int(self.width * self.mlp_ratio))
        check_bounds({"resampler_heads": self.resampler_heads, "mlp_width": self.mlp_width},
                     "visual.")  # fmt: skip
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"visual.image_size={self.image_size} is not a multiple of"
                f" patch_size={self.patch_size}"
            )
        if self.width % self.heads or self.output_dim % self.resampler_heads:
            raise ConfigError(
                f"visual widths do not divide into heads: width={self.width},"
                f" heads={self.heads}, output_dim={self.output_dim},"
                f" resampler_heads={self.resampler_heads}"
            )
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ConfigError(f"visual.n_queries={self.n_queries} must be a square (sin-cos grid)")

    @property
    def grid_size(self) -> int:
        """Patches per side: image_size // patch_size (32 at 448 px)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2


@dataclasses.dataclass(frozen=True)
class QWenConfig:
    """The LLM part of Qwen-VL's `config.json` plus the nested `visual` config."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    layer_norm_epsilon: float = 1e-6
    no_bias: bool = True
    tie_word_embeddings: bool = False
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool = False
    scale_attn_weights: bool = True
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    visual: VisualConfig = dataclasses.field(default_factory=VisualConfig)
    # Hard-coded in the reference (QWenMLP uses intermediate_size // 2); None means derive it.
    mlp_width: int | None = None

    def __post_init__(self):
        check_bounds({k: v for k, v in _fields(self).items() if k != "visual"})
        if isinstance(self.visual, dict):
            object.__setattr__(self, "visual", visual_from_dict(self.visual))
        if not isinstance(self.visual, VisualConfig):
            raise ConfigError(f"visual={self.visual!r:.80} is not a section (a JSON object)")
        if self.mlp_width is None:
            object.__setattr__(self, "mlp_width", self.intermediate_size // 2)
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads})"
                f" x kv_channels ({self.kv_channels})"
                f" != hidden_size ({self.hidden_size})"
            )
        if self.visual.output_dim != self.hidden_size:
            raise ConfigError(
                f"visual.output_dim ({self.visual.output_dim}) must equal hidden_size"
                f" ({self.hidden_size}): image features enter the token stream directly"
            )
        if self.rotary_pct != 1.0:
            raise ConfigError("only rotary_pct=1.0 (Qwen-VL's value) is implemented")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    def replace(self, **changes: Any) -> "QWenConfig":
        """A copy with fields changed; `visual={...}` updates fields of the nested visual config."""
        visual = changes.pop("visual", None)
        if isinstance(visual, dict):
            changes["visual"] = dataclasses.replace(self.visual, **visual)
        elif visual is not None:
            changes["visual"] = visual
        if "intermediate_size" in changes and "mlp_width" not in changes:
            changes["mlp_width"] = None
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF config.json
    def to_hf_dict(self) -> dict:
        """The `config.json` dict of the published release, with this config's values."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        visual = {f.name: getattr(self.visual, f.name) for f in dataclasses.fields(self.visual)}
        # Fields the reference hard-codes are written only where they differ from its values, so the
        # published config round-trips to the published config.json key set.
        for name, value in _reference_derived(self).items():
            target = visual if name.startswith("visual.") else d
            key = name.removeprefix("visual.")
            if target[key] == value:
                del target[key]
        d["visual"] = visual
        d.update(
            architectures=["QWenLMHeadModel"],
            auto_map=dict(AUTO_MAP),
            model_type="qwen",
            tokenizer_type="QWenTokenizer",
            bf16=False,
            fp16=False,
            fp32=False,
            use_cache=True,
            torch_dtype="bfloat16",
            transformers_version="4.31.0",
            onnx_safe=None,
            softmax_in_fp32=False,
        )
        return d

    def save_hf_json(self, path: str) -> None:
        """Write `config.json` (path may be a directory).

        A path not ending in `.json` is a directory: on GCS a directory exists only once it holds
        an object, so an empty one cannot be told from a missing file."""
        if not str(path).endswith(".json") or fileio.isdir(path):
            path = fileio.join(path, "config.json")
        fileio.write_text(path, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def _reference_derived(cfg: QWenConfig) -> dict:
    """The values the published code hard-codes or derives for the explicit extra fields."""
    v = cfg.visual
    return {
        "mlp_width": cfg.intermediate_size // 2,
        "visual.n_queries": 256,
        "visual.resampler_heads": v.output_dim // 128,
        "visual.mlp_width": int(v.width * v.mlp_ratio),
        "visual.pos_grid_size": 16,
        "visual.layer_norm_epsilon": 1e-6,
    }


def visual_from_dict(d: dict) -> VisualConfig:
    """The `visual` section of a config.json as a VisualConfig (unknown keys ignored).

    Raises:
      ConfigError: not a JSON object, or a field out of `BOUNDS` (named `visual.<field>`).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"visual={d!r:.80} is not a section (a JSON object)")
    names = {f.name for f in dataclasses.fields(VisualConfig)}
    return VisualConfig(**{k: v for k, v in d.items() if k in names})


def from_hf_dict(d: dict) -> QWenConfig:
    """Build a config from a Qwen-VL `config.json` dict; keys of the PyTorch wrapper are ignored.

    Raises:
      ConfigError (a ValueError): not a Qwen-VL config, or a field out of `BOUNDS` (named).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"holds a JSON {type(d).__name__}, not an object of config fields")
    if d.get("model_type", "qwen") != "qwen":
        raise ConfigError(f"config.json has model_type={d.get('model_type')!r}, expected 'qwen'")
    if "visual" not in d:
        raise ConfigError("config.json has no 'visual' section: a text-only Qwen, not Qwen-VL")
    names = {f.name for f in dataclasses.fields(QWenConfig)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["visual"] = visual_from_dict(d["visual"])
    return QWenConfig(**kwargs)


# A config.json is a few KiB; a larger "config" is not read into memory.
MAX_CONFIG_BYTES = 16 * 2**20


def read_config_json(path: str) -> dict:
    """The dict in `config.json` (path may be the checkpoint directory); errors name the file.

    A local path must be a regular file of at most MAX_CONFIG_BYTES (a FIFO would block the
    read, a device or a huge file would fill memory).
    """
    if fileio.isdir(path):
        path = fileio.join(path, "config.json")
    if not fileio.is_remote(path) and os.path.exists(path):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path} is {st.st_size} bytes; a config.json is a few KiB (at most"
                f" {MAX_CONFIG_BYTES})"
            )
    try:
        # A byte-order mark (some Windows editors write one) is not part of the JSON.
        return json.loads(fileio.read_text(path).removeprefix("\ufeff"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def load_hf_json(path: str) -> QWenConfig:
    """Read `config.json` (path may be the checkpoint directory)."""
    return from_hf_dict(read_config_json(path))


PRESETS = {
    # The published Qwen-VL / Qwen-VL-Chat values (9,656,935,168 parameters).
    "qwen-vl-7b": QWenConfig(),
    # Runs in seconds on a CPU; keeps every structural feature (2 resampler heads, an interpolated
    # 16x16 -> 4x4 position table, several heads everywhere) and the real vocabulary size.
    "tiny": QWenConfig(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=64,
        intermediate_size=1024,
        visual=VisualConfig(
            heads=4,
            image_size=56,
            layers=2,
            mlp_ratio=2.0,
            output_dim=256,
            patch_size=14,
            width=64,
        ),
    ),
}


def get_preset(name: str, **overrides: Any) -> QWenConfig:
    """A preset by name (`qwen-vl-7b` or `tiny`), with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
