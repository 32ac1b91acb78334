"""Shared pieces of the stage configs (plain ml_collections; the stage files cite the paper's
numbers).

`base()` holds every field the trainer reads, with neutral defaults; each stage file sets the values
of Qwen-VL Table 8 / section 3, and `tiny()` shrinks a stage to the tiny model for a CPU run."""

import importlib.util
import os

import ml_collections as mlc

from qwenvl_jax.errors import ConfigError, MissingPathError
from qwenvl_jax.train import model_axis  # mesh.model: an integer or "auto"

# The stage configs and example data ship inside the package (qwenvl_jax/configs/, in a wheel too);
# a checkout's top-level configs/ is a symlink to it.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STAGES = ("pretrain", "multitask", "sft")


def base() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.stage = ""
    c.seed = 0
    c.steps = 1000  # optimizer steps (Table 8 "Training steps")

    c.model = mlc.ConfigDict()
    c.model.preset = "qwen-vl-7b"  # qwenvl_jax.config.PRESETS
    c.model.overrides = (
        mlc.ConfigDict()
    )  # QWenConfig field overrides, e.g. {"num_hidden_layers": 8}
    c.model.dtype = "bfloat16"  # compute (Table 8: bfloat16)
    c.model.param_dtype = "float32"  # master weights
    c.model.scan_layers = True
    # Remat policy per tower: "auto" (the lightest of dots, save_attn, full whose compiled step
    # fits the device: train/remat.py; dots on a CPU) or one of layers.REMAT_POLICIES ("none",
    # "dots", "save_attn", "full", ...). Table 8 lists no activation checkpointing; at 2048
    # tokens the 7B stages need some (launch/README.md "Remat").
    c.model.remat_llm = "auto"
    c.model.remat_vit = "auto"
    c.model.remat_fit_gib = 0.0  # "auto": memory per device to fit in, GiB (0: the device's)
    # dot_product_attention implementation: "auto" = splash on TPU, Triton flash (packed decoder)
    # and cuDNN (ViT, adapter) on GPU, XLA on CPU (model/attention.py); or "xla", "splash",
    # "pallas_gpu", "cudnn", "jax".
    c.model.attn_impl = "auto"

    # Where the weights come from (Table 8 "ViT/LLM/VL Adapter init."). At most one of `workdir`,
    # `checkpoint` or (`vit_checkpoint`, `llm_checkpoint`); none means random init (`allow_random`).
    c.init = mlc.ConfigDict()
    c.init.workdir = ""  # a previous stage's training workdir: its latest complete step's params
    c.init.checkpoint = ""  # a converted checkpoint, an HF one (converted in memory) or a workdir
    c.init.vit_checkpoint = ""  # our-format checkpoint whose transformer.visual trunk is taken
    c.init.llm_checkpoint = ""  # our-format checkpoint whose LLM (wte, h, ln_f, lm_head) is taken
    c.init.allow_random = False

    # What the run trains on (qwenvl_jax.train.inputs). Exactly one of `train`, `mixture` or
    # `spec.sources`; a full-size stage with none stops at start.
    c.data = mlc.ConfigDict()
    # "pipeline": the data given below; "random": synthetic tokens (`:data=random` smoke runs,
    # bench); "auto" (the `:tiny` variants): the data given, else synthetic tokens.
    c.data.kind = "pipeline"
    c.data.train = ""  # official fine-tuning JSON / JSON-lines files, comma-separated (or gs://)
    c.data.mixture = ""  # a mixture JSON file (configs/data/): sources, tasks, weights
    c.data.tokenizer = ""  # tokenizer path ("" = the Qwen tiktoken vocabulary)
    c.data.seq_len = 2048  # Table 8 "LLM sequence length"
    c.data.image_size = 448  # Table 8 "Image resolution"
    c.data.max_images = 1  # static image slots per packed sequence
    # Images the ViT encodes per micro-batch (over all data shards; a multiple of data x fsdp):
    # only the valid slots are gathered, up to this many, so image work follows the images, not
    # the slots. 0 = encode every slot. A micro-batch holding more images stops the run with an
    # error naming this key (train/step.py check_image_budget); nothing is dropped silently.
    c.data.image_budget = 0
    c.data.worker_count = 0
    c.data.spec = mlc.ConfigDict()  # the pipeline's config itself (from Python; pipeline.py)
    # Bad records are skipped and counted, but a source whose first `skip_check_records` records
    # are skipped more often than this stops the run with the counts by reason (checked at start
    # on the records, then on their images as they load): wrong paths or a broken file otherwise
    # train on a fraction of the data, or wait forever for a batch (data/pipeline.py).
    # skip_check_records = 0: no limit (a source whose every record is skipped still stops).
    c.data.max_skip_fraction = 0.1
    c.data.skip_check_records = 1000

    # Held-out loss and token accuracy every `every_steps` steps on the first `batches` batches of
    # `data` (files as data.train) or `mixture`, read in file order (the same batches each time).
    c.eval = mlc.ConfigDict()
    c.eval.data = ""
    c.eval.mixture = ""
    c.eval.every_steps = 1000
    c.eval.batches = 10

    c.batch_size = 128  # global sequences per optimizer step (Table 8 "Global batch size")
    c.grad_accum = 1  # micro-batches per step (Table 8 "Gradient Acc.", per GPU in the paper)
    # Sequences per data-parallel shard per micro-step; > 0 derives the number of micro-batches
    # from the mesh (batch / (device_batch x data x fsdp)), so the global batch of Table 8 holds
    # on any slice. 0 uses grad_accum as given.
    c.device_batch = 2

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-4  # peak
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 100
    c.optim.total_steps = mlc.FieldReference(None, field_type=int)  # default: c.steps
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0
    c.optim.vit_lr_decay = 0.95
    c.optim.freeze = ()  # qwenvl_jax.optim.GROUPS names or path regexes
    c.optim.lr_scale = mlc.ConfigDict()  # {group name or regex: LR multiplier}, e.g. adapter=0.1
    # A step whose loss or gradient norm is not finite is never applied (params and optimizer
    # state stay as they were, counted in the state); then "skip" goes on, "stop" ends the run
    # with a line naming the step (exit 2), read at the next log or checkpoint step
    # (train/nonfinite.py). More than max_nonfinite_steps skipped steps in a run also stop it.
    c.optim.nonfinite = "skip"
    c.optim.max_nonfinite_steps = 10

    c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, model=model_axis.field(1)))
    c.sharding = mlc.ConfigDict()
    c.sharding.rules = ()  # () = qwenvl_jax.sharding.DEFAULT_RULES
    c.sharding.max_replicated_mb = 16.0  # fail if a bigger param is replicated on a sharded mesh
    c.sharding.allow_replicated = ()

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    # Multi-host runs without JAX's preemption service: all-gather the SIGTERM flags every this
    # many steps (with the service, the default, the check is free; train/loop.py _Preemption).
    c.checkpoint.preemption_check_every = 10

    c.log_every = 10
    # Hold the run after this step (0 = never), before its checkpoint: each process writes
    # <workdir>/paused_at_step_N.process_I and waits while it exists. Delete the files to go on;
    # SIGTERM checkpoints step N and exits. For looking at a live run, and the tests' barrier
    # before they kill or terminate one (train/loop.py).
    c.pause_after_step = 0
    # LM head + float32 log-softmax in chunks of this many positions (0 = all at once), so the
    # [B, T, 151936] float32 logits never exist in full.
    c.loss_chunk = 512
    # JAX's persistent compilation cache (local or gs://): a restarted run loads the compiled step.
    # "" = off. The trainer logs the first step's compile time and the cache's hits.
    c.compilation_cache_dir = ""
    c.chip = ""  # name for MFU ("v5p", "h100", ...); "" = guess from the device kind
    # Dry run / AOT: a TPU topology to compile for on a CPU host, e.g. "v5p:4x4x2".
    c.aot = mlc.ConfigDict(dict(topology="", chip_config="megacore", chips_per_host="2,2,1"))
    # Dry run without a topology: where the mesh is laid out (abstractly, nothing compiled): a
    # slice name ("v5p-64", "v6e-64", "v5e-16", "v4-32"; train/aot.py SLICES), a device count
    # ("8"), or "local" (this machine's devices). The 7B stages set the slice launch/README.md uses.
    c.aot.slice = "local"
    return c


def tiny(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """The tiny model at 56 px on CPU: a few steps, random synthetic data unless overridden."""
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.remat_llm = "none"
    c.model.remat_vit = "none"
    c.init.workdir = ""
    c.init.checkpoint = ""
    c.init.vit_checkpoint = ""
    c.init.llm_checkpoint = ""
    c.init.allow_random = True
    c.data.kind = "auto"  # the data given (--config.data.train=...), else random tokens
    c.data.image_size = 56
    c.data.seq_len = 128
    # 56 px gives 16 patches: 16 queries (a 4x4 sin-cos grid) instead of 256 keep images cheap.
    # The tiny preset's vocabulary and image ids, listed so flags can change them (a small
    # SentencePiece vocabulary: --config.model.overrides.vocab_size=...).
    c.model.overrides.vocab_size = 151936
    c.model.overrides.visual = {"n_queries": 16, "image_start_id": 151857}
    c.batch_size = 16
    c.device_batch = 0
    c.grad_accum = 2
    c.steps = 20
    c.optim.warmup_steps = 2
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, model=model_axis.field(1)))
    c.sharding.max_replicated_mb = 1.0
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    c.eval.every_steps = 10
    c.eval.batches = 2
    c.log_every = 1
    c.loss_chunk = 0
    c.aot.topology = ""
    c.aot.slice = "local"
    return c


def finalize(c: mlc.ConfigDict, args: dict | None = None) -> mlc.ConfigDict:
    """Settings common to every stage file; `args` the parsed variant string (`data=random`)."""
    if (args or {}).get("data") == "random":
        c.data.kind = "random"
    if c.optim.total_steps is None:
        c.optim.total_steps = c.get_ref("steps")
    return c


VARIANT_KEYS = ("tiny", "res", "data")
VARIANT_VALUES = {"data": ("random",)}


def parse_arg(arg: str | None) -> dict:
    """`tiny,res=224` -> {"tiny": True, "res": "224"}; `data=random` trains on random tokens.

    Raises:
        ValueError: on a key other than VARIANT_KEYS (a typo such as `tiyn` would otherwise
        silently select the full 7B stage).
    """
    out = {}
    for part in (arg or "").split(","):
        if part:
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip() if v else True
    unknown = sorted(set(out) - set(VARIANT_KEYS))
    if unknown:
        raise ConfigError(
            f"config string {arg!r}: unknown variant key(s) {unknown}; known: {list(VARIANT_KEYS)}"
        )
    for k, valid in VARIANT_VALUES.items():
        if k in out and out[k] not in valid:
            choices = "|".join(valid)
            raise ConfigError(f"config string {arg!r}: {k}={out[k]!r}; valid: {k}={choices}")
    return out


def resolve(spec: str) -> str:
    """`spec` (`path[:arg]`, as `--config=` takes it) with its path made to name a file.

    A path that exists is taken as given (a checkout's `configs/sft.py`, your own file). Else a
    bare stage name (`sft`) or a relative path under `configs/` (the README's `configs/sft.py`)
    names the copy installed with the package (`CONFIGS_DIR`), so the documented commands run from
    any directory; anything else comes back unchanged for the loader to report.
    """
    path, sep, arg = spec.partition(":")
    if not path or os.path.isfile(path):
        return spec
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) == 1 and not path.endswith(".py"):
        packaged = os.path.join(CONFIGS_DIR, f"{path}.py")
    elif len(parts) > 1 and parts[0] == "configs":
        packaged = os.path.join(CONFIGS_DIR, *parts[1:])
    else:
        return spec
    return f"{packaged}{sep}{arg}" if os.path.isfile(packaged) else spec


def missing_config(path: str) -> MissingPathError:
    """The error for a config file that does not exist, naming it and the stage configs."""
    return MissingPathError(
        f"config file {path!r} does not exist; the stage configs are"
        f" {', '.join(f'configs/{s}.py' for s in STAGES)} (installed with the package)"
    )


def load(spec: str) -> mlc.ConfigDict:
    """The config a config file's `get_config` returns, as `--config=` would load it.

    Args:
        spec: `path/to/file.py[:arg]` or a bare stage name (`multitask`, `sft:tiny`), resolved by
            `resolve`.

    Raises:
        MissingPathError: the file does not exist (naming it).
    """
    path, _, arg = resolve(spec).partition(":")
    if not os.path.isfile(path):
        raise missing_config(path)
    name = "qwenvl_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
