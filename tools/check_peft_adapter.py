r"""Check that PEFT loads a qwenvl_jax LoRA adapter onto the published Qwen-VL code (two steps).

Step 1, with qwenvl_jax's Python (no torch): the `tiny` reference model's recipe weights
(tests/fixtures/reference/tiny.json, as tools/make_reference_fixtures.py defines them) become our
checkpoint; `configs/sft.py:lora,tiny` trains 3 steps on random tokens from it (lm_head in
modules_to_save, so that key path is covered too); the workdir is exported as a PEFT adapter
(`convert export WD OUT --peft`) and merged (`convert export WD OUT`); our LoRA model's float32
logits on the fixture's `text` ids are saved::

  python tools/check_peft_adapter.py --train_with_qwenvl_jax /tmp/peftcheck

Step 2, in the torch environment (torch 2.13.0, transformers 4.37.2, peft), from a scratch
directory holding an empty SimSun.ttf (see make_reference_fixtures.py): the published tiny model
with the recipe weights; `get_peft_model` with the same LoraConfig (the keys PEFT itself saves,
compared with ours); `set_peft_model_state_dict` of our file (missing / unexpected keys);
`PeftModel.from_pretrained(model, adapter)` and the merged directory through the published
`from_pretrained`, each compared with our logits. The tool checks what it finds (`problems`: PEFT's
own keys, nothing missing or unexpected, both logits within 1e-5 relative, the adapter moving them
more than 1e-3) and writes the record, tests/fixtures/reference/peft_check_tiny.json, only when all
of it holds::

  /tmp/peftref/bin/python tools/check_peft_adapter.py --reference_dir /path/to/Qwen-VL-Chat \
      --check /tmp/peftcheck
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "reference")


def _ids() -> list[int]:
    fx = np.load(os.path.join(FIXTURES, "tiny_text.npz"))
    return [int(x) for x in fx["input_ids"][0][: int(fx["lengths"][0])]]


def train_with_qwenvl_jax(out: str) -> None:
    sys.path.insert(0, HERE)
    import jax
    from make_reference_fixtures import recipe_array

    from qwenvl_jax import checkpoint
    from qwenvl_jax import config as config_lib
    from qwenvl_jax.convert import import_tensors, ours
    from qwenvl_jax.convert.__main__ import main as convert_main
    from qwenvl_jax.convert.workdir import load_workdir_params
    from qwenvl_jax.train import stage_config
    from qwenvl_jax.train.loop import train
    from qwenvl_jax.train.sources import base_params
    from qwenvl_jax.train.state import build, merge_model

    with open(os.path.join(FIXTURES, "tiny.json")) as f:
        d = json.load(f)
    mcfg = config_lib.from_hf_dict(d["hf_config"])
    tensors = (
        (e["key"], recipe_array(d["seed"], e["key"], tuple(e["shape"])), "recipe")
        for e in d["recipe"]
    )
    base_dir = os.path.join(out, "base")
    ours.save_params(base_dir, import_tensors(tensors, mcfg, scan_layers=True), mcfg)

    cfg = stage_config.load("sft:lora,tiny,data=random")
    cfg.model.overrides.visual = {"n_queries": mcfg.visual.n_queries, "image_start_id": 151857}
    cfg.data.seq_len = 32
    cfg.batch_size = 2
    cfg.grad_accum = 1
    cfg.steps = 3
    cfg.optim.lr = 1e-2  # so that the adapters move the logits visibly in 3 steps
    cfg.optim.warmup_steps = 1
    cfg.lora.modules_to_save = (r"^lm_head\.",)
    cfg.model.param_dtype = "float32"
    cfg.init.checkpoint = base_dir
    cfg.init.allow_random = False
    wd = os.path.join(out, "wd")
    train(cfg, wd)
    assert convert_main(["export", wd, os.path.join(out, "adapter"), "--peft"]) == 0
    assert convert_main(["export", wd, os.path.join(out, "merged"), "--no_tokenizer"]) == 0

    s = build(cfg)
    _, trained, _ = load_workdir_params(wd)
    ids = np.asarray([_ids()], np.int32)
    logits = merge_model(s, checkpoint.stack_layers(trained), base_params(s))(ids)
    plain = stage_config.load("sft:tiny,data=random")
    plain.model.overrides.visual = cfg.model.overrides.visual.to_dict()
    sp = build(plain)
    base_logits = merge_model(sp, ours.load_params(base_dir, scan_layers=True)[1])(ids)
    np.savez(
        os.path.join(out, "ours.npz"),
        input_ids=ids,
        logits=np.asarray(jax.device_get(logits), np.float32)[0],
        base_logits=np.asarray(jax.device_get(base_logits), np.float32)[0],
    )
    print(f"wrote {out}/adapter, {out}/merged and {out}/ours.npz")


def problems(result: dict) -> list[str]:
    """What is wrong with a check's result (empty when PEFT takes our adapter), one line each."""
    out = []
    if not result["peft_keys_equal_ours"]:
        out.append(f"the keys PEFT saves differ from ours: {result['key_differences']}")
    if result["unexpected_keys"] or result["missing_lora_keys"]:
        out.append(f"unexpected keys {result['unexpected_keys']},"
                   f" missing LoRA keys {result['missing_lora_keys']}")  # fmt: skip
    # float32 on both sides; only the summation order differs.
    for key in ("adapter_relative_diff", "merged_relative_diff"):
        if result[key] > 1e-5:
            out.append(f"{key} {result[key]:.3g} > 1e-5")
    if result["adapter_moves_logits_relative"] <= 1e-3:  # else the comparison proves nothing
        out.append(f"the adapter moves the logits by {result['adapter_moves_logits_relative']:.3g}")
    return out


def check(reference_dir: str, out: str, record: str) -> None:
    sys.path.insert(0, HERE)
    import peft
    import torch
    import transformers
    from make_reference_fixtures import build_model, import_reference
    from safetensors.torch import load_file

    ref = import_reference(reference_dir)
    theirs = np.load(os.path.join(out, "ours.npz"))
    ids = torch.tensor(theirs["input_ids"].astype(np.int64))
    adapter = os.path.join(out, "adapter")
    conf = json.load(open(os.path.join(adapter, "adapter_config.json")))
    ours_sd = load_file(os.path.join(adapter, "adapter_model.safetensors"))

    def lora_config():
        return peft.LoraConfig(
            r=conf["r"],
            lora_alpha=conf["lora_alpha"],
            lora_dropout=conf["lora_dropout"],
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=conf["target_modules"],
            modules_to_save=conf["modules_to_save"],
        )

    # What PEFT itself saves for the published model with this LoraConfig.
    model, _ = build_model(ref, "tiny")
    fresh = peft.get_peft_model(model, lora_config())
    peft_sd = peft.get_peft_model_state_dict(fresh)
    ours_shapes = {k: tuple(v.shape) for k, v in ours_sd.items()}
    peft_shapes = {k: tuple(v.shape) for k, v in peft_sd.items()}
    key_diff = {
        "only_peft": sorted(set(peft_shapes) - set(ours_shapes))[:10],
        "only_ours": sorted(set(ours_shapes) - set(peft_shapes))[:10],
        "shape": sorted(
            k for k in set(ours_shapes) & set(peft_shapes) if ours_shapes[k] != peft_shapes[k]
        )[:10],  # fmt: skip
    }
    res = peft.set_peft_model_state_dict(fresh, ours_sd)
    missing_lora = sorted(k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits[0].float().numpy()

    model, _ = build_model(ref, "tiny")
    base = logits(model.eval())
    loaded = peft.PeftModel.from_pretrained(model, adapter).eval()
    got = logits(loaded)
    merged_model = ref.modeling.QWenLMHeadModel.from_pretrained(
        os.path.join(out, "merged"), fp32=True
    )
    merged = logits(merged_model.float().eval())
    scale = float(np.abs(got).max())
    result = {
        "how": "tools/check_peft_adapter.py --train_with_qwenvl_jax, then --check",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "adapter_config": conf,
        "n_tensors": len(ours_sd),
        "peft_keys_equal_ours": not any(key_diff.values()),
        "key_differences": key_diff,
        "unexpected_keys": sorted(res.unexpected_keys),
        "missing_lora_keys": missing_lora,
        "tokens": int(ids.shape[1]),
        "max_abs_logit": scale,
        "adapter_relative_diff": float(np.abs(got - theirs["logits"]).max()) / scale,
        "merged_relative_diff": float(np.abs(merged - theirs["logits"]).max()) / scale,
        "base_matches_our_base_relative": float(np.abs(base - theirs["base_logits"]).max()) / scale,
        "adapter_moves_logits_relative": float(np.abs(got - base).max()) / scale,
    }
    print(json.dumps(result, indent=1))
    bad = problems(result)
    if bad:  # the record keeps the last check that passed
        sys.exit("check failed, record not written:\n" + "\n".join(bad))
    with open(record, "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train_with_qwenvl_jax", metavar="DIR", help="step 1 (qwenvl_jax env)")
    p.add_argument("--check", metavar="DIR", help="step 2 (torch env): the DIR of step 1")
    p.add_argument("--reference_dir", help="the published Qwen-VL code files (step 2)")
    p.add_argument("--record", default=os.path.join(FIXTURES, "peft_check_tiny.json"))
    a = p.parse_args(argv)
    if a.train_with_qwenvl_jax:
        train_with_qwenvl_jax(a.train_with_qwenvl_jax)
    elif a.check:
        if not a.reference_dir:
            p.error("--check needs --reference_dir")
        check(a.reference_dir, a.check, a.record)
    else:
        p.error("give --train_with_qwenvl_jax DIR or --check DIR")


if __name__ == "__main__":
    main()
