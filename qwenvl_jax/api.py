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

from qwenvl_jax import chat as chat_lib
from qwenvl_jax import config as config_lib
from qwenvl_jax import convert
from qwenvl_jax import image as image_lib
from qwenvl_jax import tokenizer as tok_lib
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.model.factory import build_model, load_params
from qwenvl_jax.model.options import ModelOptions
from qwenvl_jax.model.qwen import dynamic_ntk_alpha
from qwenvl_jax.model.qwenvl import QWenLMHeadModel
from qwenvl_jax.sharding import resolve_mesh

# Generation defaults when the checkpoint has no generation_config.json: greedy, as the API.
DEFAULT_GENERATION = {"max_new_tokens": 512, "do_sample": False, "top_p": None, "top_k": None}
GENERATION_KEYS = ("max_new_tokens", "do_sample", "top_p", "top_k", "temperature")
# generation_config.json keys kept besides GENERATION_KEYS: chat's history window (6144 published).
CHAT_KEYS = ("max_window_size",)
# What each kept key of a generation_config.json may hold (None allowed where marked): a bad value
# is named at load, not deep inside the first `generate`. top_k 0 is the published "off".
GENERATION_BOUNDS = {
    "max_new_tokens": (config_lib.Bound(int, 1, 2**20), False),
    "do_sample": (config_lib.Bound(bool), False),
    "top_p": (config_lib.Bound(float, 0, 1, open_low=True), True),
    "top_k": (config_lib.Bound(int, 0, 2**21), True),
    "temperature": (config_lib.Bound(float, 0, 100, open_low=True), True),
    "max_window_size": (config_lib.Bound(int, 1, 2**20), False),
}
# `logits` right-pads prompts to a multiple of this, so prompts of similar length share one
# compilation (causal attention: the padding cannot change the logits of the real positions).
LOGITS_BUCKET = 64


@functools.partial(jax.jit, static_argnames=("graphdef", "use_logn", "ctx"))
def _forward(graphdef, state, input_ids, images, index, ntk_alpha, *, use_logn, ctx=None):
    """Jitted full forward: float32 logits [B, T, V]. Module level, so every QwenVL with the same
    graphdef (e.g. a reloaded export) reuses the compilations."""
    from qwenvl_jax.generate import _scope

    with _scope(ctx):
        model = nnx.merge(graphdef, state)
        out = model(
            input_ids,
            images=images,
            image_token_index=index,
            ntk_alpha=ntk_alpha,
            use_logn=use_logn,
        )
    return out.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_logn", "ctx"))
def _token_losses(graphdef, state, input_ids, images, index, ntk_alpha, *, use_logn, ctx=None):
    """float32 [B, T-1]: cross-entropy of each next token (log-softmax in float32)."""
    logits = _forward(graphdef, state, input_ids, images, index, ntk_alpha, use_logn=use_logn,
                      ctx=ctx)  # fmt: skip
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def default_dtype() -> str:
    """bfloat16 on an accelerator, float32 on a CPU (where the parity tests run)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def inference_options(dtype: Any = None, options: ModelOptions | None = None) -> ModelOptions:
    """The model options of `from_pretrained` / `random`: `options` as given, else
    `ModelOptions.inference(dtype)` with dtype defaulting to `default_dtype()`.

    Raises:
      ValueError: both given (the dtype belongs inside the options then).
    """
    if options is not None:
        if dtype is not None:
            raise ValueError(f"pass dtype={dtype!r} inside options, not beside it")
        return options
    return ModelOptions.inference(default_dtype() if dtype is None else dtype)


def read_generation_config(path: str) -> dict | None:
    """The generation defaults in checkpoint directory `path`'s generation_config.json.

    Only GENERATION_KEYS and CHAT_KEYS are kept (the file also holds HF's bookkeeping).

    Returns:
      key -> value, or None when the directory has no generation_config.json.

    Raises:
      CheckpointError: the file is not JSON or not an object, or a kept key's value is of the wrong
        type or out of `GENERATION_BOUNDS` (the message names the file and the key).
    """
    gen_file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_file):
        return None
    try:
        with open(gen_file, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise CheckpointError(f"{gen_file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{gen_file} holds a JSON {type(d).__name__}, not an object")
    gen = {k: v for k, v in d.items() if k in GENERATION_KEYS + CHAT_KEYS}
    for key, value in gen.items():
        bound, nullable = GENERATION_BOUNDS[key]
        if not (value is None and nullable) and not bound.holds(value):
            what = bound.describe() + (" or null" if nullable else "")
            raise CheckpointError(f"{gen_file}: {key}={value!r:.80} is not {what}")
    return gen


def _has(path: str, *names: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in names)


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
      mesh: the device mesh the parameters are sharded over (None: one device).
    """

    def __init__(
        self,
        model: QWenLMHeadModel,
        tokenizer: tok_lib.Tokenizer | None = None,
        *,
        generation_config: dict | None = None,
        allow_urls: bool = False,
        image_root: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.model = model
        self.mesh = mesh
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
        dtype: str | None = None,
        *,
        options: ModelOptions | None = None,
        tokenizer: Any = None,
        allow_urls: bool = False,
        image_root: str | None = None,
        mesh: Any = None,
        quantize: str | None = None,
    ) -> QwenVL:
        """Load a checkpoint.

        Args:
          path: an HF Qwen-VL directory (config.json + safetensors or pytorch_model*.bin), a
            directory in qwenvl_jax's own format (config.json + params/), or a training workdir
            (its latest complete step under checkpoints/).
          dtype: "float32", "bfloat16" or "float16": parameter and compute dtype (norms,
            softmax and rotary always run in float32). Default: bfloat16 on an accelerator,
            float32 on a CPU.
          options: the `ModelOptions` to build with (e.g. another `attn_impl`); default
            `ModelOptions.inference(dtype)` (the reference attention math). Not with `dtype`.
          tokenizer: a tokenizer object or a path for `load_tokenizer`; default: the tokenizer
            files in `path` if any, else the published vocabulary.
          allow_urls: let `<img>` spans hold http(s) URLs that are fetched.
          image_root: directory for relative image paths (default: the current directory).
          mesh: shard the parameters (and generation's KV cache and activations) over a device
            mesh: a `jax.sharding.Mesh` with axes (data, fsdp, model), or its sizes as a string
            ("fsdp=4,model=2"; unnamed axes are 1, one may be -1) or a dict. None: one device.
          quantize: "int8" (or "fp8") for weight-only decoder matrices with per output channel
            scales (`quantize.MODES`); the visual tower, embeddings and norms keep `dtype`. None:
            no quantisation.
        """
        options = inference_options(dtype, options)
        mesh = resolve_mesh(mesh)
        gen = read_generation_config(path)  # a bad file is named before any weight is read
        cfg, params = load_params(path)
        model = build_model(cfg, params, options, mesh=mesh, quantize=quantize, source=path)
        del params
        if tokenizer is None or isinstance(tokenizer, str):
            tok_path = tokenizer
            if tok_path is None and _has(path, "qwen.tiktoken", tok_lib.SP_MODEL_NAME):
                tok_path = path
            tokenizer = tok_lib.load_tokenizer(tok_path, image_span=cfg.visual.n_queries)
        return cls(
            model,
            tokenizer,
            generation_config=gen,
            allow_urls=allow_urls,
            image_root=image_root,
            mesh=mesh,
        )

    @classmethod
    def random(
        cls,
        config: str | config_lib.QWenConfig = "tiny",
        *,
        seed: int = 0,
        dtype: str | None = None,
        options: ModelOptions | None = None,
        tokenizer: Any = None,
        mesh: Any = None,
        quantize: str | None = None,
    ) -> QwenVL:
        """A randomly initialised model (a preset name or a config), for tests and demos.

        dtype / options as `from_pretrained`, except that dtype defaults to float32 (tests compare
        against float32 references on any backend).
        """
        cfg = config_lib.get_preset(config) if isinstance(config, str) else config
        mesh = resolve_mesh(mesh)
        if dtype is None and options is None:
            dtype = "float32"
        options = inference_options(dtype, options)
        model = build_model(cfg, None, options, seed=seed, mesh=mesh, quantize=quantize)
        if isinstance(tokenizer, str):
            tokenizer = tok_lib.load_tokenizer(tokenizer, image_span=cfg.visual.n_queries)
        return cls(model, tokenizer, mesh=mesh)

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
        index, _ = tok_lib.image_token_index(
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
            ctx=self._ctx(1),
        )
        return np.asarray(out[0, :n], np.float32)

    def _ctx(self, batch: int):
        """The static sharding context of a batch (None on one device)."""
        from qwenvl_jax import generate as gen_lib

        if self.mesh is None:
            return None
        return gen_lib.ShardingContext(self.mesh, gen_lib.inference_rules(self.mesh, batch))

    def _batch(self, prompts: Sequence[str | Sequence[int]]) -> tuple[list[list[int]], Any]:
        """(ids per row, images float32 [B, M, S, S, 3] zero-padded to the most images, or None)."""
        xs = [self.prepare(p) for p in prompts]
        rows = [x["input_ids"][0].tolist() for x in xs]
        m = max((x["images"].shape[1] for x in xs if x["images"] is not None), default=0)
        if not m:
            return rows, None
        s = self.config.visual.image_size
        images = np.zeros((len(xs), m, s, s, 3), np.float32)
        for b, x in enumerate(xs):
            if x["images"] is not None:
                images[b, : x["images"].shape[1]] = x["images"][0]
        return rows, images

    def token_losses(self, prompts: Sequence[str | Sequence[int]]) -> list[np.ndarray]:
        """Per-token next-token cross-entropy of each prompt (one batched forward).

        Rows are right-padded (causal attention: padding never changes the real positions), to a
        multiple of LOGITS_BUCKET and, on a mesh, to a batch multiple of data x fsdp. NTK alpha
        follows the longest row.

        Returns:
          one float32 array [T_i - 1] per prompt: entry t is -log p(ids[t + 1] | ids[:t + 1]).
        """
        rows, images = self._batch(prompts)
        n = max(len(r) for r in rows)
        width = -(-n // LOGITS_BUCKET) * LOGITS_BUCKET
        bsz = len(rows)
        if self.mesh is not None:
            k = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            bsz = -(-bsz // k) * k
        ids = np.zeros((bsz, width), np.int32)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        index = None
        if images is not None:
            images = np.concatenate([images, np.zeros((bsz - len(rows),) + images.shape[1:])])
            index, _ = tok_lib.image_token_index(
                ids, self.config.visual.image_start_id, self.config.visual.n_queries
            )
            index = jnp.asarray(index)
            images = jnp.asarray(images, self.model.dtype)
        alpha, use_logn = self._inference_rope(n)
        graphdef, state = nnx.split(self.model)
        out = _token_losses(graphdef, state, jnp.asarray(ids), images, index, jnp.float32(alpha),
                            use_logn=use_logn, ctx=self._ctx(bsz))  # fmt: skip
        out = np.asarray(out, np.float32)
        return [out[b, : len(r) - 1] for b, r in enumerate(rows)]

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
        text: str | Sequence[int] | Sequence[str],
        *,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        **generation: Any,
    ) -> list[int] | list[list[int]]:
        """Continue `text` with the KV-cached decoder (prefill and decode compiled once per shape).

        Args:
          text: a prompt string (may hold `<img>path</img>`) or prompt ids; a list of strings is a
            batch (`generate_batch`).
          stop_words_ids: id sequences after which generation ends (the published
            StopWordsLogitsProcessor: the step after a stop sequence emits `<|endoftext|>`).
          seed: PRNG seed for sampling.
          **generation: max_new_tokens, do_sample, top_p, top_k, temperature (defaults from
            `generation_config`).

        Returns:
          the new ids (prompt excluded), ending with `<|endoftext|>` when generation stopped on it.
        """
        if isinstance(text, list | tuple) and text and isinstance(text[0], str):
            return self.generate_batch(text, stop_words_ids=stop_words_ids, seed=seed, **generation)
        return self.generate_batch([text], stop_words_ids=stop_words_ids, seed=seed, **generation)[
            0
        ]

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        min_new_tokens: int = 0,
        batch_multiple: int = 1,
        **generation: Any,
    ) -> list[list[int]]:
        """Continue several prompts at once: left-padded, one prefill and one on-device decode loop.

        Each row stops on its own (eos, or a stop word). On a mesh the batch and the KV cache are
        split over data x fsdp and the heads over model.

        Args:
          prompts: strings (may hold `<img>path</img>`) or id lists; rows may hold different
            numbers of images.
          stop_words_ids, seed, **generation: as `generate`.
          min_new_tokens: eos is barred before this many new tokens (the eval scripts' setting).
          batch_multiple: pad the batch to a multiple of this (one compilation for every batch of
            an evaluation, the last one included).

        Returns:
          the new ids of every prompt, in order.
        """
        from qwenvl_jax import generate as gen_lib

        if not prompts:
            return []
        rows, images = self._batch(prompts)
        args = self._generation_args(generation)
        temperature = args.get("temperature")
        return gen_lib.generate(
            self.model,
            rows,
            images=images,
            max_new_tokens=int(args["max_new_tokens"]),
            min_new_tokens=int(min_new_tokens),
            do_sample=bool(args.get("do_sample")),
            temperature=1.0 if temperature is None else float(temperature),
            top_k=int(args.get("top_k") or 0),
            top_p=1.0 if args.get("top_p") is None else float(args["top_p"]),
            stop_words_ids=[list(s) for s in (stop_words_ids or [])],
            eos_token_id=self.tokenizer.eod_id,
            rng=jax.random.key(seed),
            batch_multiple=batch_multiple,
            mesh=self.mesh,
        )

    def chat(
        self,
        query: str,
        history: list[tuple[str, str]] | None = None,
        system: str = chat_lib.SYSTEM,
        *,
        max_window_size: int | None = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        **generation: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One ChatML turn, as the published `model.chat(tokenizer, query, history)`.

        `qwenvl_jax.chat.chat_batch` with one row: the prompt comes from `make_context` (history
        truncated to `max_window_size`, default 6144), generation stops on `<|im_end|>` /
        `<|im_start|>` (plus `stop_words_ids`), and the response is the decoded text up to the
        first of them.

        Returns:
          (response, history): history is the given list (or a new one) with (query, response)
          appended, as the published code does.
        """
        if history is None:
            history = []
        (response,) = chat_lib.chat_batch(
            self,
            [query],
            [history],
            system=system,
            max_window_size=max_window_size,
            stop_words_ids=stop_words_ids,
            seed=seed,
            **generation,
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
