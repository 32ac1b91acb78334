"""The inference API: load Qwen-VL, score text, generate, chat, export.

    from qwenvl_jax import QwenVL
    model = QwenVL.from_pretrained(path, dtype="float32")  # HF dir, our dir, or a training workdir
    model.tokenizer.encode(text) / .decode(ids)
    model.logits(text)                                     # float32 numpy [T, V]
    model.generate(text, max_new_tokens=32)                # new ids (greedy by default)
    response, history = model.chat("Picture 1: <img>a.jpg</img>\\nWhat is this?")
    model.save_pretrained(out_dir)                         # HF / PyTorch format

Text may hold `<img>path</img>` spans: the tokenizer expands them to n_queries + 2 ids carrying the
path (258 as published), the images are loaded with the published preprocessing at
`config.visual.image_size`, and their features replace the n_queries inner positions. As in the
published code at inference, dynamic NTK and logn attention scaling are active (identity for prompts
up to `seq_length` = 2048 tokens).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax import config as config_lib
from qwenvl_jax import convert
from qwenvl_jax import image as image_lib
from qwenvl_jax import tokenizer as tok_lib
from qwenvl_jax.model.qwen import dynamic_ntk_alpha
from qwenvl_jax.model.qwenvl import QWenLMHeadModel, image_token_index

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Generation defaults when the checkpoint has no generation_config.json: greedy, as the API.
DEFAULT_GENERATION = {"max_new_tokens": 512, "do_sample": False, "top_p": None, "top_k": None}
GENERATION_KEYS = ("max_new_tokens", "do_sample", "top_p", "top_k", "temperature")
# generation_config.json keys kept besides GENERATION_KEYS: chat's history window (6144 published).
CHAT_KEYS = ("max_window_size",)
# `logits` right-pads prompts to a multiple of this, so prompts of similar length share one
# compilation (causal attention: the padding cannot change the logits of the real positions).
LOGITS_BUCKET = 64


@functools.partial(jax.jit, static_argnames=("graphdef", "use_logn"))
def _forward(graphdef, state, input_ids, images, index, ntk_alpha, *, use_logn):
    """Jitted full forward: float32 logits [B, T, V]. Module level, so every QwenVL with the same
    graphdef (e.g. a reloaded export) reuses the compilations."""
    model = nnx.merge(graphdef, state)
    out = model(
        input_ids,
        images=images,
        image_token_index=index,
        ntk_alpha=ntk_alpha,
        use_logn=use_logn,
    )
    return out.astype(jnp.float32)


def _dtype(dtype: str | Any):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def _has(path: str, *names: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def checkpoint_kind(path: str) -> str:
    """ "hf", "ours" or "workdir" for a checkpoint directory (see `QwenVL.from_pretrained`)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    files = os.listdir(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if os.path.isdir(os.path.join(path, "params")):
        return "ours"
    if any(
        f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
        for f in files
    ):
        return "hf"
    raise FileNotFoundError(
        f"{path} is not a Qwen-VL checkpoint: expected *.safetensors / pytorch_model*.bin (HF),"
        " params/ (qwenvl_jax format) or checkpoints/ (training workdir);"
        f" found {sorted(files)[:20]}"
    )


def load_params(path: str) -> tuple[config_lib.QWenConfig, dict]:
    """(config, pure nested param dict in the per-layer layout) from any supported checkpoint."""
    kind = checkpoint_kind(path)
    if kind == "workdir":
        from qwenvl_jax import checkpoint

        return checkpoint.latest_params(path, scan_layers=False)
    if kind == "ours":
        return convert.load_params(path, scan_layers=False)
    return convert.import_hf(path)


def _random_params(abstract: dict, std: float, seed: int) -> dict:
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
    dtype=jnp.float32,
    *,
    seed: int = 0,
    attn_impl: str = "xla",
) -> QWenLMHeadModel:
    """A QWenLMHeadModel holding `params` (cast to dtype), or random weights when params is None."""

    def make(rngs):
        return QWenLMHeadModel(cfg, rngs=rngs, dtype=dtype, param_dtype=dtype, attn_impl=attn_impl)

    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    want = nnx.to_pure_dict(state)
    if params is None:
        params = _random_params(want, cfg.initializer_range, seed)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    missing = sorted(map(jax.tree_util.keystr, flat_want.keys() - flat_got.keys()))
    extra = sorted(map(jax.tree_util.keystr, flat_got.keys() - flat_want.keys()))
    if missing or extra:
        raise convert.CheckpointMismatchError(
            f"parameters do not match the model: missing {missing[:5]}, extra {extra[:5]}"
        )
    for k, v in flat_want.items():
        if tuple(flat_got[k].shape) != tuple(v.shape):
            raise convert.CheckpointMismatchError(
                f"parameter {jax.tree_util.keystr(k)} has shape {tuple(flat_got[k].shape)},"
                f" the model expects {tuple(v.shape)}"
            )
    cast = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype=dtype), params)
    nnx.replace_by_pure_dict(state, cast)
    return nnx.merge(graphdef, state)


class QwenVL:
    """A loaded Qwen-VL model with its tokenizer: scoring, generation, chat and export.

    Build it with `QwenVL.from_pretrained(path)` (or `QwenVL.random(config)` for tests and demos).

    Attributes:
      model: the `QWenLMHeadModel` (Flax NNX).
      config: its `QWenConfig`.
      tokenizer: `QWenTokenizer` or `SentencePieceQWenTokenizer`.
      generation_config: defaults for `generate`/`chat` (from the checkpoint's
        generation_config.json when it has one, else greedy with max_new_tokens=512).
      allow_urls: whether `<img>https://...</img>` may be fetched.
      image_root: directory that relative image paths in `<img>` spans are read from (default: the
        current directory). Short relative paths matter for models whose spans are short
        (`n_queries` - 1 bytes at most).
    """

    def __init__(
        self,
        model: QWenLMHeadModel,
        tokenizer: tok_lib.Tokenizer | None = None,
        *,
        generation_config: dict | None = None,
        allow_urls: bool = False,
        image_root: str | None = None,
    ):
        self.model = model
        self.image_root = image_root
        self.config = model.config
        n_queries = self.config.visual.n_queries
        if tokenizer is None:
            tokenizer = tok_lib.QWenTokenizer(image_span=n_queries)
        self.tokenizer = tokenizer
        if self.tokenizer.n_vocab > self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.n_vocab} tokens but the model's vocab_size is"
                f" {self.config.vocab_size}"
            )
        if self.tokenizer.img_start_id != self.config.visual.image_start_id:
            raise ValueError(
                f"tokenizer's <img> id {self.tokenizer.img_start_id} !="
                f" config.visual.image_start_id {self.config.visual.image_start_id}"
            )
        if self.tokenizer.image_span != n_queries:
            raise ValueError(
                f"tokenizer's <img> spans hold {self.tokenizer.image_span} positions but the model"
                f" emits config.visual.n_queries={n_queries} features per image; load the"
                f" tokenizer with image_span={n_queries}"
            )
        self.generation_config = dict(DEFAULT_GENERATION)
        self.generation_config.update(generation_config or {})
        self.allow_urls = allow_urls

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "float32",
        *,
        tokenizer: Any = None,
        attn_impl: str = "xla",
        allow_urls: bool = False,
        image_root: str | None = None,
    ) -> QwenVL:
        """Load a checkpoint.

        Args:
          path: an HF Qwen-VL directory (config.json + safetensors or pytorch_model*.bin), a
            directory in qwenvl_jax's own format (config.json + params/), or a training workdir
            (its latest complete step under checkpoints/).
          dtype: "float32", "bfloat16" or "float16": parameter and compute dtype (norms,
            softmax and rotary always run in float32).
          tokenizer: a tokenizer object or a path for `load_tokenizer`; default: the tokenizer
            files in `path` if any, else the published vocabulary.
          attn_impl: attention implementation passed to the model.
          allow_urls: let `<img>` spans hold http(s) URLs that are fetched.
          image_root: directory for relative image paths (default: the current directory).
        """
        jdtype = _dtype(dtype)
        cfg, params = load_params(path)
        model = build_model(cfg, params, jdtype, attn_impl=attn_impl)
        del params
        if tokenizer is None or isinstance(tokenizer, str):
            tok_path = tokenizer
            if tok_path is None and _has(path, "qwen.tiktoken", tok_lib.SP_MODEL_NAME):
                tok_path = path
            tokenizer = tok_lib.load_tokenizer(tok_path, image_span=cfg.visual.n_queries)
        gen = None
        gen_file = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                gen = {k: v for k, v in json.load(f).items() if k in GENERATION_KEYS + CHAT_KEYS}
        return cls(
            model, tokenizer, generation_config=gen, allow_urls=allow_urls, image_root=image_root
        )

    @classmethod
    def random(
        cls,
        config: str | config_lib.QWenConfig = "tiny",
        *,
        seed: int = 0,
        dtype: str = "float32",
        tokenizer: Any = None,
    ) -> QwenVL:
        """A randomly initialised model (a preset name or a config), for tests and demos."""
        cfg = config_lib.get_preset(config) if isinstance(config, str) else config
        model = build_model(cfg, None, _dtype(dtype), seed=seed)
        if isinstance(tokenizer, str):
            tokenizer = tok_lib.load_tokenizer(tokenizer, image_span=cfg.visual.n_queries)
        return cls(model, tokenizer)

    # ------------------------------------------------------------------ inputs
    def prepare(self, text_or_ids: str | Sequence[int]) -> dict[str, np.ndarray]:
        """Model inputs for one sequence.

        Args:
          text_or_ids: text (encoded with `tokenizer.encode`, special-token text parsed as the
            published tokenizer does) or token ids with expanded image spans.

        Returns:
          {"input_ids": int32 [1, T], "images": float32 [1, M, S, S, 3] or None,
           "image_token_index": int32 [1, T] or None}.
        """
        if isinstance(text_or_ids, str):
            ids = self.tokenizer.encode(text_or_ids)
        else:
            ids = [int(i) for i in text_or_ids]
        if not ids:
            raise ValueError("empty input: nothing to run the model on")
        input_ids = np.asarray(ids, np.int32)[None]
        paths = self.tokenizer.image_paths(ids)
        if not paths:
            return {"input_ids": input_ids, "images": None, "image_token_index": None}
        size = self.config.visual.image_size
        if self.image_root:
            paths = [image_lib.resolve_path(p, self.image_root) for p in paths]
        images = image_lib.load_images(paths, size, allow_urls=self.allow_urls)[None]
        index, _ = image_token_index(
            input_ids, self.config.visual.image_start_id, self.config.visual.n_queries
        )
        return {"input_ids": input_ids, "images": images, "image_token_index": index}

    def _inference_rope(self, n_tokens: int) -> tuple[float, bool]:
        """(ntk_alpha, use_logn) of the published model at inference for an n-token prefill."""
        cfg = self.config
        alpha = dynamic_ntk_alpha(n_tokens, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
        return alpha, bool(cfg.use_logn_attn)

    # ------------------------------------------------------------------ scoring
    def logits(self, text: str | Sequence[int]) -> np.ndarray:
        """Next-token logits at every position, as the published model computes them at inference.

        Args:
          text: a string (may hold `<img>path</img>`) or token ids.

        Returns:
          float32 numpy [T, V] (V = config.vocab_size).
        """
        x = self.prepare(text)
        n = x["input_ids"].shape[1]
        alpha, use_logn = self._inference_rope(n)  # from the real length, not the padded one
        pad = ((0, 0), (0, -(-n // LOGITS_BUCKET) * LOGITS_BUCKET - n))
        index = x["image_token_index"]
        graphdef, state = nnx.split(self.model)  # per call: sees in-place updates of self.model
        out = _forward(
            graphdef,
            state,
            jnp.asarray(np.pad(x["input_ids"], pad)),
            None if x["images"] is None else jnp.asarray(x["images"], self.model.dtype),
            None if index is None else jnp.asarray(np.pad(index, pad, constant_values=-1)),
            jnp.float32(alpha),
            use_logn=use_logn,
        )
        return np.asarray(out[0, :n], np.float32)

    # ------------------------------------------------------------------ generation
    def _generation_args(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(GENERATION_KEYS)
        if unknown:
            raise TypeError(
                f"unknown generation arguments {sorted(unknown)}; use {GENERATION_KEYS}"
            )
        args = {k: v for k, v in self.generation_config.items() if k in GENERATION_KEYS}
        args.update(overrides)
        return args

    def generate(
        self,
        text: str | Sequence[int],
        *,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        **generation: Any,
    ) -> list[int]:
        """Continue `text` with the KV-cached decoder (prefill and decode compiled once per shape).

        Args:
          text: a prompt string (may hold `<img>path</img>`) or prompt ids.
          stop_words_ids: id sequences after which generation ends (the published
            StopWordsLogitsProcessor: the step after a stop sequence emits `<|endoftext|>`).
          seed: PRNG seed for sampling.
          **generation: max_new_tokens, do_sample, top_p, top_k, temperature (defaults from
            `generation_config`).

        Returns:
          the new ids (prompt excluded), ending with `<|endoftext|>` when generation stopped on it.
        """
        from qwenvl_jax import generate as gen_lib

        x = self.prepare(text)
        args = self._generation_args(generation)
        images = None if x["images"] is None else x["images"][0]
        temperature = args.get("temperature")
        return gen_lib.generate(
            self.model,
            x["input_ids"][0],
            images=images,
            max_new_tokens=int(args["max_new_tokens"]),
            do_sample=bool(args.get("do_sample")),
            temperature=1.0 if temperature is None else float(temperature),
            top_k=int(args.get("top_k") or 0),
            top_p=1.0 if args.get("top_p") is None else float(args["top_p"]),
            stop_words_ids=[list(s) for s in (stop_words_ids or [])],
            eos_token_id=self.tokenizer.eod_id,
            rng=jax.random.key(seed),
        )

    def chat(
        self,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = "You are a helpful assistant.",
        *,
        max_window_size: int | None = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        **generation: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One ChatML turn, as the published `model.chat(tokenizer, query, history)`.

        The prompt comes from `make_context` (history truncated to `max_window_size`, default
        6144), generation stops on `<|im_end|>` / `<|im_start|>` (plus `stop_words_ids`), and the
        response is the decoded text up to the first of them.

        Returns:
          (response, history): history is the given list (or a new one) with (query, response)
          appended, as the published code does.
        """
        if history is None:
            history = []
        window = max_window_size or self.generation_config.get("max_window_size", 6144)
        raw_text, context = tok_lib.make_context(
            self.tokenizer, query, history=history, system=system, max_window_size=window
        )
        stops = [list(s) for s in (stop_words_ids or [])] + tok_lib.stop_words_ids(self.tokenizer)
        new = self.generate(context, stop_words_ids=stops, seed=seed, **generation)
        response = tok_lib.decode_chatml(
            self.tokenizer, list(context) + list(new), len(raw_text), len(context)
        )
        history.append((query, response))
        return response, history

    # ------------------------------------------------------------------ export
    def save_pretrained(self, out_dir: str, *, dtype: Any = None) -> list[str]:
        """Write an HF Qwen-VL directory (safetensors shards + index, config.json,
        generation_config.json, tokenizer files) that the published PyTorch code loads.

        Args:
          out_dir: created if needed.
          dtype: cast the weights on export (e.g. "bfloat16"); None keeps the model's dtype.

        Returns:
          the paths written.
        """
        if isinstance(dtype, str):
            import ml_dtypes

            dtype = {"bfloat16": ml_dtypes.bfloat16}.get(dtype, np.dtype(dtype))
        return convert.export_hf(
            self.model, self.config, out_dir, dtype=dtype, tokenizer=self.tokenizer
        )

    def save(self, out_dir: str) -> None:
        """Write qwenvl_jax's own format (config.json + Orbax params/) plus the tokenizer files."""
        convert.save_params(out_dir, self.model, self.config)
        self.tokenizer.save_vocabulary(out_dir)
