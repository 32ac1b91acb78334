r"""Check the README walk-through's exports in the published PyTorch code (and `peft`).

Step 1, with qwenvl_jax's Python: the walk-through test, keeping its files (the user's JSON and
pictures, the HF checkpoint it starts from, the full and LoRA workdirs, the merged exports
out/hf_full and out/hf, the PEFT adapter out/adapter, and our float32 logits ours.npz on a training
question with its picture)::

  QWENVL_WALKTHROUGH_DIR=/tmp/walk python -m pytest -n0 tests/train/test_finetune_walkthrough.py \
      -k readme

Step 2, in the torch environment (torch, transformers 4.37.2, peft), from a scratch directory
holding an empty SimSun.ttf (see make_reference_fixtures.py): the published QWenLMHeadModel loads
each merged export (`from_pretrained(..., output_loading_info=True)`: missing / unexpected keys),
and the walk-through's starting model (the tiny recipe weights) with `PeftModel.from_pretrained`
(the keys PEFT itself would save for that LoraConfig, modules_to_save wte and lm_head included,
compared with ours); each gives logits on the same ids and picture, compared with ours; greedy chat
answers to the training questions from all three. The tool checks what it finds (`problems`: no
missing or unexpected keys, logits within 1e-4 of their scale, training moved them 100x more,
PEFT's own keys, every model answers the training questions) and writes the record,
tests/fixtures/walkthrough/torch_check.json, only when all of it holds::

  /tmp/peftref/bin/python tools/check_walkthrough_export.py --reference_dir /path/to/Qwen-VL-Chat \
      --check /tmp/walk
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECORD = os.path.join(ROOT, "tests", "fixtures", "walkthrough", "torch_check.json")
QUESTION = "What colour is the shape?"  # as tests/train/test_finetune_walkthrough.py asks
TRAIN = [("circle", "red"), ("square", "green"), ("triangle", "blue")]


def problems(result: dict) -> list[str]:
    """What is wrong with a check's result (empty when the exports pass), one line each."""
    out = []
    checks = result["checks"]
    for name in ("full", "lora_merged", "peft_adapter"):
        c = checks[name]
        if c["missing_keys"] or c["unexpected_keys"]:
            out.append(f"{name}: missing {c['missing_keys']}, unexpected {c['unexpected_keys']}")
        # float32 on both sides, one forward of 2 layers: a few ulps of the logits' scale.
        if c["max_abs_diff"] > 1e-4 * c["max_abs_logit"]:
            out.append(f"{name}: logits differ by {c['max_abs_diff']:.3g} (> 1e-4 x"
                       f" {c['max_abs_logit']:.3g})")  # fmt: skip
        # ... while training moved the logits far more than that.
        if c["moved_from_base"] <= 100 * c["max_abs_diff"]:
            out.append(f"{name}: training moved the logits by only {c['moved_from_base']:.3g}")
        if result["answers"][name] != result["answers"]["expected"]:
            out.append(f"{name}: answered {result['answers'][name]}")
    if not checks["peft_adapter"]["peft_keys_equal_ours"]:
        out.append("peft_adapter: the keys PEFT saves differ from ours")
    if checks["peft_adapter"]["modules_to_save"] != ["wte", "lm_head"]:
        out.append(f"peft_adapter: modules_to_save {checks['peft_adapter']['modules_to_save']}")
    return out


def check(reference_dir: str, walk: str, record: str) -> None:
    sys.path.insert(0, HERE)
    import peft
    import torch
    import transformers
    from make_reference_fixtures import build_model, import_reference
    from safetensors.torch import load_file

    ref = import_reference(reference_dir)
    ours = np.load(os.path.join(walk, "ours.npz"))
    ids = torch.tensor(ours["input_ids"].astype(np.int64))[None]
    tok = ref.tokenization.QWenTokenizer(os.path.join(reference_dir, "qwen.tiktoken"))

    def load(path):
        m, info = ref.modeling.QWenLMHeadModel.from_pretrained(
            path, fp32=True, output_loading_info=True
        )
        return m.float().eval(), info

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits[0].float().numpy()

    def answers(m):
        # A PeftModel's LoRA layers sit inside its base model: chat through that.
        m = m.get_base_model() if isinstance(m, peft.PeftModel) else m
        m.generation_config = transformers.GenerationConfig(
            chat_format="chatml", max_window_size=6144, do_sample=False, max_new_tokens=4,
            eos_token_id=tok.eod_id, pad_token_id=tok.eod_id,
        )  # fmt: skip
        out = []
        for shape, colour in TRAIN:
            q = f"Picture 1: <img>{walk}/img/{shape}_{colour}.png</img>\n{QUESTION}"
            out.append(m.chat(tok, q, history=None)[0])
        return out

    # The walk-through's starting checkpoint is tests/fixtures/reference/tiny.json's recipe weights
    # (its file has no safetensors metadata, which transformers 4.37 requires): built here.
    base = logits(build_model(ref, "tiny")[0])

    def compare(got, want):
        return {
            "max_abs_logit": float(np.abs(want).max()),
            "max_abs_diff": float(np.abs(got - want).max()),
            "moved_from_base": float(np.abs(got - base).max()),
        }

    checks, said = {}, {"expected": [c for _, c in TRAIN]}
    for name, sub, key in (("full", "hf_full", "full"), ("lora_merged", "hf", "lora")):
        m, info = load(os.path.join(walk, "out", sub))
        checks[name] = {
            **compare(logits(m), ours[key]),
            "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]),
        }
        said[name] = answers(m)

    adapter = os.path.join(walk, "out", "adapter")
    conf = json.load(open(os.path.join(adapter, "adapter_config.json")))
    ours_sd = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    lora_config = peft.LoraConfig(
        r=conf["r"], lora_alpha=conf["lora_alpha"], lora_dropout=conf["lora_dropout"],
        bias="none", task_type="CAUSAL_LM", target_modules=conf["target_modules"],
        modules_to_save=conf["modules_to_save"],
    )  # fmt: skip
    fresh = peft.get_peft_model(build_model(ref, "tiny")[0], lora_config)
    peft_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(fresh).items()}
    our_keys = {k: tuple(v.shape) for k, v in ours_sd.items()}
    res = peft.set_peft_model_state_dict(fresh, ours_sd)
    loaded = peft.PeftModel.from_pretrained(build_model(ref, "tiny")[0], adapter)
    checks["peft_adapter"] = {
        **compare(logits(loaded.eval()), ours["lora"]),
        "peft_keys_equal_ours": peft_keys == our_keys,
        "n_tensors": len(ours_sd),
        "modules_to_save": conf["modules_to_save"],
        "missing_keys": sorted(
            k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k
        ),
        "unexpected_keys": sorted(res.unexpected_keys),
    }
    said["peft_adapter"] = answers(loaded)
    result = {
        "how": "QWENVL_WALKTHROUGH_DIR=DIR pytest tests/train/test_finetune_walkthrough.py"
        " -k readme, then tools/check_walkthrough_export.py --check DIR",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "tokens": int(ids.shape[1]),
        "checks": checks,
        "answers": said,
    }
    print(json.dumps(result, indent=1))
    bad = problems(result)
    if bad:  # the record keeps the last check that passed
        sys.exit("check failed, record not written:\n" + "\n".join(bad))
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", metavar="DIR", required=True, help="the kept walk-through DIR")
    p.add_argument("--reference_dir", required=True, help="the published Qwen-VL code files")
    p.add_argument("--record", default=RECORD)
    a = p.parse_args(argv)
    check(a.reference_dir, os.path.abspath(a.check), a.record)


if __name__ == "__main__":
    main()
