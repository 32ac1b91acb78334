r"""Write golden fixtures by running the published PyTorch Qwen-VL code on tiny random models.

The published code (modeling_qwen.py, visual.py, tokenization_qwen.py, qwen_generation_utils.py,
configuration_qwen.py, qwen.tiktoken) is NOT part of this repository: --reference_dir names a copy.
It is imported as a package from that directory and run in float32 on the CPU, with torch and
transformers 4.37.2 (a separate environment; torch is not a dependency of qwenvl_jax).

What it writes into --out_dir (default tests/fixtures/reference):
  README.md                      how the fixtures were made, and the weight recipe in words
  img_a.png, img_b.jpg           the test images (made here, deterministic)
  <model>.json                   the HF config, the weight recipe (key, shape, std, mean, sha256 of
                                 the float32 bytes) of each tiny model
  <model>_<case>.npz             inputs and the reference's outputs of one forward pass
  <model>_gen_<case>.npz         a greedy generation with the chat stop words
  bin_mini/                      a tiny bf16 checkpoint written by the reference's save_pretrained
                                 as sharded pytorch_model-*.bin files with an index
  bin_dtypes.bin                 torch.save of a few tensors in several dtypes and memory layouts
  export_check_<model>.json      with --verify_export: the reference loading a directory exported by
                                 qwenvl_jax (missing/unexpected keys, logits against the fixtures)

The weights are not stored (the real vocabulary makes them ~300 MB): each tensor is drawn from
numpy's default_rng([seed, crc32(key)]) as mean + std * standard_normal(shape) in float32, with the
std/mean in the <model>.json recipe; the tests regenerate them with numpy and check each sha256.

Run it from a scratch directory outside the repository that holds an empty SimSun.ttf (the
reference tokenizer module downloads a font at import time otherwise), e.g.::

  mkdir -p /tmp/qref && cd /tmp/qref && touch SimSun.ttf
  /path/to/torch-venv/bin/python /path/to/qwenvl_jax/tools/make_reference_fixtures.py \
      --reference_dir /path/to/Qwen-VL-Chat --out_dir /path/to/qwenvl_jax/tests/fixtures/reference

Check that the published code loads what qwenvl_jax exports (two steps, two environments):

  # 1. with qwenvl_jax's Python (no torch): the recipe weights -> our importer -> our model
  #    (scan layout with --scan_layers) -> export_hf
  python tools/make_reference_fixtures.py --export_with_qwenvl_jax /tmp/exp_tiny --model tiny
  # 2. with the torch environment, from the scratch directory: load it with the reference's
  #    from_pretrained, list missing/unexpected keys, compare logits with the fixtures
  /path/to/torch-venv/bin/python .../make_reference_fixtures.py --reference_dir ... \
      --verify_export /tmp/exp_tiny --model tiny
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
import zlib

import numpy as np

IMAGE_START_ID = 151857
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643

# HF config.json values of the tiny models (the keys of the published config.json).
_COMMON = dict(
    model_type="qwen",
    architectures=["QWenLMHeadModel"],
    rotary_emb_base=10000,
    rotary_pct=1.0,
    layer_norm_epsilon=1e-6,
    no_bias=True,
    tie_word_embeddings=False,
    seq_length=2048,
    max_position_embeddings=8192,
    use_dynamic_ntk=True,
    use_logn_attn=True,
    use_flash_attn=False,
    scale_attn_weights=True,
    emb_dropout_prob=0.0,
    attn_dropout_prob=0.0,
    initializer_range=0.02,
    bf16=False,
    fp16=False,
    fp32=True,
)
MODELS = {
    # Equal to qwenvl_jax's `tiny` preset: 16x16 position table resized to 4x4, 2 resampler heads.
    "tiny": dict(
        _COMMON,
        vocab_size=151936,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=64,
        intermediate_size=1024,
        visual=dict(
            heads=4,
            image_size=56,
            image_start_id=IMAGE_START_ID,
            layers=2,
            mlp_ratio=2.0,
            output_dim=256,
            patch_size=14,
            width=64,
        ),
    ),
    # Other sizes: 224 px so the 16x16 table is used as is (no resize), head_dim 128 like the real
    # model, an odd ViT MLP width int(96 * 4.9231) = 472, 3 decoder layers.
    "wide224": dict(
        _COMMON,
        vocab_size=151936,
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        kv_channels=128,
        intermediate_size=768,
        visual=dict(
            heads=2,
            image_size=224,
            image_start_id=IMAGE_START_ID,
            layers=2,
            mlp_ratio=4.9231,
            output_dim=256,
            patch_size=14,
            width=96,
        ),
    ),
    # Only for the .bin reader test (small vocabulary: never run with the tokenizer).
    "bin_mini": dict(
        _COMMON,
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        kv_channels=64,
        intermediate_size=256,
        visual=dict(
            heads=2,
            image_size=28,
            image_start_id=IMAGE_START_ID,
            layers=2,
            mlp_ratio=2.0,
            output_dim=128,
            patch_size=14,
            width=32,
        ),
    ),
}
SEEDS = {"tiny": 1234, "wide224": 5678, "bin_mini": 42}

# Tokens whose full logit rows are stored, and how many vocabulary columns are sampled everywhere.
N_SAMPLED_COLUMNS = 64


# ----------------------------------------------------------------------------- weight recipe
def recipe_std_mean(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(std, mean) of the seeded normal that tensor `key` (PyTorch layout) is drawn from."""
    leaf = key.rsplit(".", 1)[-1]
    norm = any(
        f".{n}." in f".{key}"
        for n in ("ln_1", "ln_2", "ln_f", "ln_pre", "ln_post", "ln_q", "ln_kv")
    )
    if norm and leaf == "weight":
        return 0.1, 1.0
    if leaf in ("bias", "in_proj_bias"):
        return 0.1, 0.0
    if key in ("transformer.wte.weight",):
        return 1.0, 0.0
    if leaf in ("positional_embedding", "query", "pos_embed"):
        return 0.5, 0.0
    if key == "transformer.visual.proj":  # used as x @ proj: the input dim is first
        return 1.0 / np.sqrt(shape[0]), 0.0
    fan_in = int(np.prod(shape[1:]))
    return 1.0 / np.sqrt(fan_in), 0.0


def recipe_array(seed: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor of `key`: mean + std * default_rng([seed, crc32(key)]).standard_normal."""
    std, mean = recipe_std_mean(key, shape)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    return (np.float32(mean) + np.float32(std) * x).astype(np.float32)


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- images
def make_images(out_dir: str) -> list[str]:
    """Two small deterministic images: a PNG with gradients and a JPEG with shapes."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:48, 0:64]
    a = np.stack([xx * 4, yy * 5, (xx + yy) * 2 % 256], -1).astype(np.uint8)
    Image.fromarray(a).save(os.path.join(out_dir, "img_a.png"))
    b = Image.new("RGB", (50, 70), (30, 120, 200))
    d = ImageDraw.Draw(b)
    d.rectangle([5, 8, 30, 40], fill=(250, 200, 10))
    d.ellipse([20, 30, 48, 66], fill=(200, 20, 60))
    d.line([0, 69, 49, 0], fill=(255, 255, 255), width=3)
    b.save(os.path.join(out_dir, "img_b.jpg"), quality=90)
    return ["img_a.png", "img_b.jpg"]


# ----------------------------------------------------------------------------- reference import
def import_reference(reference_dir: str):
    """Import the published files as the package `qwen_reference` (they use relative imports)."""
    # torchvision wheels built for CUDA fail to register their C++ ops against a CPU torch; the
    # reference only uses torchvision.transforms (PIL resize, ToTensor, Normalize), which do not
    # need them, so the op registrations are skipped.
    sys.modules.setdefault(
        "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
    )
    if not os.path.exists("SimSun.ttf"):
        raise SystemExit(
            "run this from a scratch directory holding an empty SimSun.ttf (see --help): the "
            "reference tokenizer downloads a font at import time otherwise"
        )
    link_root = tempfile.mkdtemp(prefix="qwen_reference_")
    os.symlink(os.path.abspath(reference_dir), os.path.join(link_root, "qwen_reference"))
    sys.path.insert(0, link_root)
    import importlib

    ref = types.SimpleNamespace(
        modeling=importlib.import_module("qwen_reference.modeling_qwen"),
        configuration=importlib.import_module("qwen_reference.configuration_qwen"),
        tokenization=importlib.import_module("qwen_reference.tokenization_qwen"),
        generation_utils=importlib.import_module("qwen_reference.qwen_generation_utils"),
    )
    return ref


def build_model(ref, name: str):
    """The reference QWenLMHeadModel of config `name`, float32, eval mode, recipe weights."""
    import torch

    cfg = ref.configuration.QWenConfig(**MODELS[name])
    torch.manual_seed(0)
    model = ref.modeling.QWenLMHeadModel(cfg).float().eval()
    state = model.state_dict()
    recipe = []
    new_state = {}
    for key, t in state.items():
        shape = tuple(t.shape)
        arr = recipe_array(SEEDS[name], key, shape)
        std, mean = recipe_std_mean(key, shape)
        recipe.append(
            dict(key=key, shape=list(shape), std=float(std), mean=float(mean), sha256=sha256(arr))
        )
        new_state[key] = torch.from_numpy(arr)
    missing, unexpected = model.load_state_dict(new_state, strict=True)
    assert not missing and not unexpected
    return model, recipe


# ----------------------------------------------------------------------------- forward cases
def text_cases(tok, images: list[str]) -> dict[str, list[list[int]]]:
    """Token ids (rows) of each forward case, from the reference tokenizer."""
    text = "Hello, 世界! Qwen-VL in JAX: 12345 tokens\n\tand   whitespace runs 🙂 <ref>a cat</ref>"
    one = f"Picture 1: <img>{images[0]}</img>\nWhat is in this picture? 图中有什么？"
    two = f"Picture 1: <img>{images[0]}</img>\nPicture 2: <img>{images[1]}</img>\nCompare them."
    # > 2048 tokens so that dynamic NTK (alpha 3) and logn scaling are active.
    words = " ".join(f"word{i % 97} 数字{i % 13}," for i in range(420))
    long_ids = tok(words).input_ids
    assert len(long_ids) > 2100, len(long_ids)
    long_ids = long_ids[:2100]
    long_img = tok(f"<img>{images[1]}</img> tail").input_ids + long_ids[:1900]
    return {
        "text": [tok(text).input_ids],
        "image1": [tok(one).input_ids],
        "image2": [tok(two).input_ids],
        "long": [long_ids],
        "long_image": [long_img],
        # A batch of two rows (right-padded, with an attention mask): 1 image, then 2 images.
        "batch": [tok(one).input_ids, tok(two + " 两张图片").input_ids],
    }


def run_forward(model, ids_rows: list[list[int]], cols: np.ndarray) -> dict[str, np.ndarray]:
    """One prefill forward of the reference; returns inputs, image tensors and logit samples.

    Args:
      model: the reference QWenLMHeadModel.
      ids_rows: token ids of each batch row (right-padded with <|endoftext|> to the longest).
      cols: int [C] vocabulary columns whose logits are stored at every position.
    """
    import torch

    B = len(ids_rows)
    T = max(len(r) for r in ids_rows)
    ids = np.full((B, T), ENDOFTEXT, np.int64)
    mask = np.zeros((B, T), np.int64)
    for i, r in enumerate(ids_rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    captured = {}

    def pre_hook(module, args):
        captured["pixel_values"] = args[0].detach().float().numpy().copy()

    def post_hook(module, args, out):
        captured["image_features"] = out.detach().float().numpy().copy()

    visual = model.transformer.visual
    h1 = visual.register_forward_pre_hook(pre_hook)
    h2 = visual.register_forward_hook(post_hook)
    with torch.no_grad():
        out = model.transformer(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask) if B > 1 else None,
            use_cache=False,
        )
        hidden = out.last_hidden_state  # [B, T, D]
        V = model.lm_head.weight.shape[0]
        # Full rows: the last real token of each row (the one generation continues from).
        full_pos = [(i, len(r) - 1) for i, r in enumerate(ids_rows)]
        max_abs = 0.0
        sampled = np.zeros((B, T, len(cols)), np.float32)
        full = np.zeros((len(full_pos), V), np.float32)
        for i in range(B):
            for s in range(0, T, 256):
                logits = model.lm_head(hidden[i, s : s + 256]).float().numpy()  # [chunk, V]
                n_real = max(0, min(len(ids_rows[i]) - s, logits.shape[0]))
                if n_real:
                    max_abs = max(max_abs, float(np.abs(logits[:n_real]).max()))
                sampled[i, s : s + 256] = logits[:, cols]
                for j, (bi, p) in enumerate(full_pos):
                    if bi == i and s <= p < s + 256:
                        full[j] = logits[p - s]
    h1.remove()
    h2.remove()
    res = dict(
        input_ids=ids.astype(np.int32),
        lengths=np.array([len(r) for r in ids_rows], np.int32),
        sampled_columns=np.asarray(cols, np.int32),
        logits_sampled=sampled,
        full_positions=np.array(full_pos, np.int32),
        logits_full=full,
        max_abs_logit=np.float32(max_abs),
        last_hidden=hidden[:, -1].float().numpy(),
    )
    res.update(captured)
    return res


def run_generation(
    model, tok, ref, prompt_ids: list[int], max_new_tokens: int
) -> dict[str, np.ndarray]:
    """HF generate with do_sample=False and the chat stop words (<|im_end|>, <|im_start|>)."""
    import torch
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        chat_format="chatml",
        do_sample=False,
        eos_token_id=ENDOFTEXT,
        pad_token_id=ENDOFTEXT,
        max_new_tokens=max_new_tokens,
    )
    stop_words_ids = ref.generation_utils.get_stop_words_ids("chatml", tok)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen_cfg,
            stop_words_ids=stop_words_ids,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(prompt_ids) :].numpy()
    margins = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return dict(
        prompt_ids=np.array(prompt_ids, np.int32),
        new_ids=new.astype(np.int32),
        top2_margin=np.array(margins, np.float32),
        stop_words_ids=np.array([w[0] for w in stop_words_ids], np.int32),
    )


def chat_prompt(ref, tok, query: str) -> list[int]:
    _, ids = ref.generation_utils.make_context(
        tok,
        query,
        history=[],
        system="You are a helpful assistant.",
        max_window_size=6144,
        chat_format="chatml",
    )
    return ids


# ----------------------------------------------------------------------------- .bin fixtures
def write_bin_fixtures(ref, out_dir: str) -> dict:
    """A sharded bf16 pytorch_model-*.bin checkpoint (save_pretrained) and a dtype sampler."""
    import torch

    model, recipe = build_model(ref, "bin_mini")
    d = os.path.join(out_dir, "bin_mini")
    shutil.rmtree(d, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=False, max_shard_size="300KB")
    for f in os.listdir(
        d
    ):  # keep only the weights and the index; the config is recorded in bin_mini.json
        if not (f.startswith("pytorch_model") or f == "config.json"):
            os.remove(os.path.join(d, f))
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    samples = {
        "f32": base.clone(),
        "bf16": (base - 1.5).to(torch.bfloat16),
        "f16": (base * 3).to(torch.float16),
        "f32_transposed": base.t(),  # non-contiguous strides
        "f32_view_offset": base.view(-1)[5:17],  # shares base's storage at an offset
        "bf16_scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    samples["f32_shared_again"] = samples["f32_view_offset"]
    torch.save(samples, os.path.join(out_dir, "bin_dtypes.bin"))
    torch.save(
        {"ok": base.clone(), "ids": torch.arange(5, dtype=torch.int64)},
        os.path.join(out_dir, "bin_int64.bin"),
    )
    np.savez(
        os.path.join(out_dir, "bin_dtypes_expected.npz"),
        **{k: v.float().contiguous().numpy() for k, v in samples.items()},
    )
    return dict(recipe=recipe)


# ----------------------------------------------------------------------------- export check
def verify_export(ref, export_dir: str, name: str, out_dir: str, suffix: str = "") -> None:
    """Load a directory exported by qwenvl_jax into the reference and compare with the fixtures."""
    model, info = ref.modeling.QWenLMHeadModel.from_pretrained(
        export_dir, output_loading_info=True, fp32=True
    )
    model = model.float().eval()
    result = {
        "export_dir": os.path.basename(os.path.abspath(export_dir)),
        "how": "make_reference_fixtures.py --export_with_qwenvl_jax, then --verify_export",
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": [list(map(str, m)) for m in info["mismatched_keys"]],
        "files": sorted(os.listdir(export_dir)),
        "cases": {},
    }
    import torch

    sd = model.state_dict()
    recipe = {k: recipe_array(SEEDS[name], k, tuple(sd[k].shape)) for k in sd}
    result["weights_equal_recipe"] = all(
        np.array_equal(sd[k].float().numpy(), recipe[k]) for k in sd
    )
    # A bfloat16 export: every value is the float32 recipe rounded to bf16 by torch.
    result["weights_equal_recipe_rounded_to_bf16"] = all(
        np.array_equal(
            sd[k].float().numpy(),
            torch.from_numpy(recipe[k]).to(torch.bfloat16).float().numpy(),
        )
        for k in sd
    )
    del recipe
    for case in ("text", "image1", "image2", "long"):
        path = os.path.join(out_dir, f"{name}_{case}.npz")
        if not os.path.exists(path):
            continue
        fx = np.load(path)
        rows = [list(r[:n]) for r, n in zip(fx["input_ids"], fx["lengths"], strict=True)]
        got = run_forward(model, rows, fx["sampled_columns"])
        scale = float(fx["max_abs_logit"])
        diff_full = float(np.abs(got["logits_full"] - fx["logits_full"]).max())
        diff_sampled = float(np.abs(got["logits_sampled"] - fx["logits_sampled"]).max())
        result["cases"][case] = dict(
            max_abs_diff_full_rows=diff_full,
            max_abs_diff_sampled_columns=diff_sampled,
            max_abs_logit=scale,
            relative=max(diff_full, diff_sampled) / scale,
        )
    path = os.path.join(out_dir, f"export_check_{name}{suffix}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


def export_with_qwenvl_jax(
    fixture_dir: str, name: str, export_dir: str, scan_layers: bool, dtype: str
) -> None:
    """Step 1 of the export check, run with qwenvl_jax installed (no torch needed).

    The recipe weights go through qwenvl_jax's importer into its NNX model, and the model's
    parameters are exported with `qwenvl_jax.convert.export_hf`.
    """
    from flax import nnx

    from qwenvl_jax import config as config_lib
    from qwenvl_jax.convert import assign_params, export_hf, import_tensors
    from qwenvl_jax.model.options import ModelOptions
    from qwenvl_jax.model.qwenvl import QWenLMHeadModel

    with open(os.path.join(fixture_dir, f"{name}.json")) as f:
        d = json.load(f)
    cfg = config_lib.from_hf_dict(d["hf_config"])
    tensors = (
        (e["key"], recipe_array(d["seed"], e["key"], tuple(e["shape"])), "recipe")
        for e in d["recipe"]
    )
    model = nnx.eval_shape(
        lambda: QWenLMHeadModel(cfg, ModelOptions(scan_layers=scan_layers), rngs=nnx.Rngs(0))
    )
    assign_params(model, import_tensors(tensors, cfg, scan_layers=scan_layers))
    if dtype == "bfloat16":
        import ml_dtypes

        export_hf(model, cfg, export_dir, dtype=ml_dtypes.bfloat16, progress=print)
    else:
        export_hf(model, cfg, export_dir, max_shard_bytes=100 * 2**20, progress=print)
    print(f"exported {name} (scan_layers={scan_layers}) to {export_dir}")


# ----------------------------------------------------------------------------- main
README = """# Golden fixtures from the published Qwen-VL PyTorch code

Written by `tools/make_reference_fixtures.py` (see its `--help`), which imports the published
`modeling_qwen.py`, `visual.py`, `tokenization_qwen.py`, `qwen_generation_utils.py` and
`configuration_qwen.py` from a directory given on its command line and runs them in float32 on the
CPU with torch {torch} and transformers {transformers}. Nothing here was computed by qwenvl_jax.

## Models (`<model>.json`)
`hf_config` is the `config.json` the reference model was built from; `recipe` lists every key of
the reference `state_dict()` in order with its shape. Weights are not stored: tensor `key` is `mean
+ std * numpy.random.default_rng([seed, zlib.crc32(key.encode())]).standard_normal(shape,
dtype=float32)` in float32 (PyTorch layout), with `seed`, `std`, `mean` from the json; `sha256` is
the hash of the float32 bytes, so a regenerated tensor can be checked. The rule for std/mean: norm
weights 1 + 0.1 N, biases 0.1 N, `wte` N(0, 1), `positional_embedding`/`query`/`pos_embed` 0.5 N,
every other matrix N(0, 1/fan_in) with fan_in = prod(shape[1:]) (shape[0] for `visual.proj`).
- `tiny`: equal to qwenvl_jax's `tiny` preset (56 px images: the 16x16 position table is resized
  to 4x4).
- `wide224`: 224 px (table used as is), head_dim 128, ViT MLP width int(96 * 4.9231) = 472,
  3 layers.
- `bin_mini`: vocabulary 512, only for the `.bin` reader (`bin_mini/` holds its bf16 checkpoint
  as written by the reference's `save_pretrained` with `safe_serialization=False`).

## Forward cases (`<model>_<case>.npz`)
Made from text with the reference tokenizer (`qwen.tiktoken` of the reference directory), images
`img_a.png` / `img_b.jpg` referenced by these relative names inside `<img>...</img>`: `text`,
`image1`, `image2` (two images in one sequence), `long` (2100 tokens: dynamic NTK with alpha 3 and
logn scaling active), `long_image` (an image, then 1900+ tokens), `batch` (two rows, right-padded
with 151643 and given an attention mask; 1 and 2 images). Arrays: `input_ids` int32 [B, T],
`lengths` [B], `pixel_values` float32 [M, 3, S, S] (the reference's own preprocessing of the
images, in the order the model consumed them) and `image_features` [M, 256, D] (the visual tower's
output), `logits_full` [R, V] at `full_positions` (R rows of (batch, position)), `logits_sampled`
[B, T, {ncols}] at vocabulary columns `sampled_columns` for every position, `max_abs_logit` = max
|logit| over all real positions and the whole vocabulary (the scale of the 1e-4 relative
criterion), `last_hidden` [B, D] (final hidden state after ln_f, last position). Logits are the
reference `lm_head` applied to the reference `transformer` output, in chunks.

## Generations (`<model>_gen_<case>.npz`)
`model.generate(..., do_sample=False, stop_words_ids=[[151645], [151644]], eos_token_id=151643)`:
`prompt_ids`, `new_ids` (the generated ids), `top2_margin` (top-1 minus top-2 processed score per
step; a tiny margin would make greedy decoding fragile). Chat prompts come from the reference
`make_context`.

## `.bin` samples
`bin_dtypes.bin`: `torch.save` of float32 / bfloat16 / float16 tensors, a transposed
(non-contiguous) view, a view at a storage offset (stored twice, sharing one storage) and a bf16
scalar; `bin_dtypes_expected.npz` holds them as float32. `bin_int64.bin` holds an int64 tensor (a
dtype the importer refuses).

## Export check (`export_check_<model>.json`)
Step 1, in qwenvl_jax's environment: `--export_with_qwenvl_jax DIR --model NAME [--scan_layers]`
imports the recipe weights with qwenvl_jax's importer into its NNX model and exports the model with
`qwenvl_jax.convert.export_hf`. Step 2, in the torch environment: `--verify_export DIR --model NAME`
loads DIR with the reference's `QWenLMHeadModel.from_pretrained`, and records missing / unexpected
/ mismatched keys, whether every loaded tensor equals the recipe, and the logit differences against
these fixtures (`tiny` was exported from the per-layer layout, `wide224` from the scan layout).
`export_check_tiny_bf16.json`: `tiny` exported from the scan layout with `--export_dtype bfloat16`
(its logits differ from the float32 fixtures by the bf16 rounding of the weights; every loaded
weight equals torch's bf16 rounding of the recipe).
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reference_dir", help="directory with the published Qwen-VL code files")
    p.add_argument(
        "--out_dir",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "reference"
        ),
        help="fixture directory to write (default: tests/fixtures/reference of this repository)",
    )
    p.add_argument(
        "--models", default="tiny,wide224", help="comma-separated models for forward fixtures"
    )
    p.add_argument(
        "--verify_export", default=None, help="directory exported by qwenvl_jax to check"
    )
    p.add_argument(
        "--model", default="tiny", help="with --verify_export: which fixture model it holds"
    )
    p.add_argument(
        "--export_with_qwenvl_jax",
        default=None,
        metavar="DIR",
        help="(qwenvl_jax environment, no torch) export --model's fixture weights through"
        " qwenvl_jax's importer, model and exporter into DIR, for --verify_export",
    )
    p.add_argument("--scan_layers", action="store_true", help="with --export_with_qwenvl_jax")
    p.add_argument(
        "--check_suffix", default="", help="with --verify_export: export_check_<model><suffix>.json"
    )
    p.add_argument(
        "--export_dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="with --export_with_qwenvl_jax: the dtype written",
    )
    args = p.parse_args(argv)
    if args.export_with_qwenvl_jax:
        export_with_qwenvl_jax(
            os.path.abspath(args.out_dir),
            args.model,
            args.export_with_qwenvl_jax,
            args.scan_layers,
            args.export_dtype,
        )
        return
    if not args.reference_dir:
        p.error("--reference_dir is required (except with --export_with_qwenvl_jax)")

    import torch
    import transformers

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ref = import_reference(args.reference_dir)
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for im in ("img_a.png", "img_b.jpg"):  # the reference opens image paths relative to the cwd
        if os.path.exists(os.path.join(out_dir, im)):
            shutil.copy(os.path.join(out_dir, im), im)
    if args.verify_export:
        verify_export(ref, args.verify_export, args.model, out_dir, args.check_suffix)
        return

    images = make_images(out_dir)
    for im in images:  # the reference opens image paths relative to the working directory
        shutil.copy(os.path.join(out_dir, im), im)
    tok = ref.tokenization.QWenTokenizer(os.path.join(args.reference_dir, "qwen.tiktoken"))

    for name in args.models.split(","):
        print(f"[{name}] building reference model", flush=True)
        model, recipe = build_model(ref, name)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(dict(hf_config=MODELS[name], seed=SEEDS[name], recipe=recipe), f, indent=1)
        rng = np.random.default_rng(SEEDS[name] + 1)
        V = MODELS[name]["vocab_size"]
        for case, rows in text_cases(tok, images).items():
            if name != "tiny" and case in ("long_image", "batch"):
                continue
            print(f"[{name}] forward {case}: {[len(r) for r in rows]} tokens", flush=True)
            cols = np.sort(rng.choice(V, N_SAMPLED_COLUMNS, replace=False))
            res = run_forward(model, rows, cols)
            np.savez_compressed(os.path.join(out_dir, f"{name}_{case}.npz"), **res)
        gens = {
            "chat_text": (chat_prompt(ref, tok, "你好! Tell me a story about JAX."), 12),
            "chat_image": (
                chat_prompt(ref, tok, f"Picture 1: <img>{images[0]}</img>\nDescribe it."),
                8,
            ),
        }
        if name == "tiny":
            gens["long"] = (text_cases(tok, images)["long"][0], 4)
        for case, (prompt, n) in gens.items():
            print(f"[{name}] generate {case}: {len(prompt)} prompt tokens, {n} new", flush=True)
            res = run_generation(model, tok, ref, prompt, n)
            print(
                f"    new ids {res['new_ids'].tolist()} min margin {res['top2_margin'].min():.4g}"
            )
            np.savez_compressed(os.path.join(out_dir, f"{name}_gen_{case}.npz"), **res)
        del model

    print("[bin] writing .bin fixtures", flush=True)
    info = write_bin_fixtures(ref, out_dir)
    with open(os.path.join(out_dir, "bin_mini.json"), "w") as f:
        json.dump(
            dict(hf_config=MODELS["bin_mini"], seed=SEEDS["bin_mini"], recipe=info["recipe"]),
            f,
            indent=1,
        )
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(
            README.format(
                torch=torch.__version__,
                transformers=transformers.__version__,
                ncols=N_SAMPLED_COLUMNS,
            )
        )
    print(f"done: {out_dir}")


if __name__ == "__main__":
    main()
